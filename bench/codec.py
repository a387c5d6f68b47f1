"""DL/T 645 codec throughput on one core: frames deframed/decoded and encoded per second.

The input is the 20-byte forward-active-energy reply with 4 FE wake-up bytes (24 bytes), fed to
the streaming deframer one frame per ``feed`` call, as a bus read delivers it. Three figures:
deframe only (bytes -> Frame), full decode (Frame -> ReadReply -> catalogue value), and encode
(ReadRequest -> bytes). Each is the median of ``--runs`` runs of ``--seconds`` each.

DL/T 698.45 (``dlt698_decode``, :func:`bench_dlt698_decode`): the full decode of what a meter
answers to the gateway's poll, a GET-Response-NormalList of 4 OADs (forward active energy total
and 4 tariffs, voltages, currents, active powers: 15 values) as the simulated meter frames it
(4 FE, 124 bytes), fed one frame per ``feed``: deframe + frame check (HCS, FCS) + APDU parse +
catalogue scaling of every value (``requests.readings``). Goal: >= 50,000 frames/s. The three
indented lines after it time each stage alone (deframe, APDU parse, readings) on the same frame.
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
from meter_gateway.protocols.dlt698 import apdu as ap698
from meter_gateway.protocols.dlt698 import requests as rq698
from meter_gateway.protocols.dlt698.axdr import OAD
from meter_gateway.protocols.dlt698.catalogue import default_catalogue as default_catalogue_698
from meter_gateway.protocols.dlt698.deframer import Deframer as Deframer698
from meter_gateway.protocols.dlt698.frame import Frame as Frame698
from meter_gateway.protocols.dlt698.frame import ServerAddress

FRAME = bytes.fromhex("FE FE FE FE 68 61 01 00 00 00 00 68 91 08 33 33 34 33 59 33 33 33 8A 16")
E7 = Edition.DLT645_2007


def _rate(step: Callable[[int], None], seconds: float, clock: Callable[[], float] = time.perf_counter) -> float:
    batch = 2000
    done = 0
    start = clock()
    while (elapsed := clock() - start) < seconds:
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


DLT698_OADS = (OAD(0x0010, 2, 0), OAD(0x2000, 2, 0), OAD(0x2001, 2, 0), OAD(0x2004, 2, 0))


def dlt698_response() -> bytes:
    """The simulated meter's answer to a GET-Request-NormalList of :data:`DLT698_OADS`."""
    import datetime

    from meter_gateway.simulators.clock import SimClock
    from meter_gateway.simulators.dlt698_meter import Dlt698Meter

    meter = Dlt698Meter("000000000161", clock=SimClock(datetime.datetime(2026, 3, 14, 10, 0), 0.0), seed=1)
    request = rq698.get(ServerAddress.parse("000000000161"), list(DLT698_OADS), piid=1)
    [reply] = meter.handle(request)
    return reply


DLT698_FRAME = dlt698_response()
_DEFRAMER_698 = Deframer698()


def bench_dlt698_decode(n: int) -> None:
    """Full decode of ``n`` GET-Response-NormalList frames (see the module doc)."""
    catalogue = default_catalogue_698()
    feed = _DEFRAMER_698.feed
    parse = ap698.parse_apdu
    readings = rq698.readings
    for _ in range(n):
        for frame in feed(DLT698_FRAME):
            if isinstance(frame, Frame698):
                readings(parse(frame.apdu), catalogue)


def _dlt698_apdu() -> bytes:
    [frame] = Deframer698().feed(DLT698_FRAME)
    assert isinstance(frame, Frame698)
    return frame.apdu


DLT698_APDU = _dlt698_apdu()


def bench_dlt698_deframe(n: int) -> None:
    """The first stage of :func:`bench_dlt698_decode` alone: deframe and frame check."""
    feed = _DEFRAMER_698.feed
    for _ in range(n):
        feed(DLT698_FRAME)


def bench_dlt698_parse(n: int) -> None:
    """The second stage alone: the APDU parse (A-XDR Data included)."""
    parse = ap698.parse_apdu
    for _ in range(n):
        parse(DLT698_APDU)


def bench_dlt698_readings(n: int) -> None:
    """The third stage alone: the catalogue's readings of the parsed response."""
    catalogue = default_catalogue_698()
    readings = rq698.readings
    apdu = ap698.parse_apdu(DLT698_APDU)
    for _ in range(n):
        readings(apdu, catalogue)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench codec", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="time by the process's CPU time, not the wall clock (a machine shared with other work)",
    )
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    assert decode_check()
    clock = time.process_time if args.cpu else time.perf_counter
    seconds = f"{args.seconds}s of CPU time" if args.cpu else f"{args.seconds}s"
    print(f"Python {platform.python_version()} on {platform.machine()}, {args.runs} runs x {seconds}, 1 core")
    assert dlt698_check()
    steps = (
        ("deframe", deframe),
        ("decode", decode),
        ("encode", encode),
        ("dlt698_decode", bench_dlt698_decode),
        ("  deframe", bench_dlt698_deframe),
        ("  parse", bench_dlt698_parse),
        ("  readings", bench_dlt698_readings),
    )
    for name, step in steps:
        rates = [_rate(step, args.seconds, clock) for _ in range(args.runs)]
        median = statistics.median(rates)
        print(
            f"{name:13} median {median:>10,.0f}/s  {1e6 / median:6.2f} us"
            f"  (min {min(rates):,.0f}, max {max(rates):,.0f})"
        )
    return 0


def decode_check() -> bool:
    [frame] = Deframer().feed(FRAME)
    assert isinstance(frame, Frame)
    reply = parse_message(frame, E7)
    assert isinstance(reply, ReadReply)
    return default_catalogue().decode(E7, reply.di, reply.value)[0].value == 0.26


def dlt698_check() -> bool:
    """The benchmark's frame decodes to the 15 values it claims (one frame, one parse)."""
    [frame] = Deframer698().feed(DLT698_FRAME)
    assert isinstance(frame, Frame698)
    apdu = ap698.parse_apdu(frame.apdu)
    assert isinstance(apdu, ap698.GetResponseNormalList)
    values = rq698.readings(apdu, default_catalogue_698())
    return len(DLT698_FRAME) == 124 and len(values) == 15 and all(v.value is not None for v in values)

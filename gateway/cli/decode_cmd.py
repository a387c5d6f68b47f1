"""`meter-gateway decode HEX...`: decode DL/T 645, DL/T 698.45 and CJ/T 188 frames from a sniffer.

Input is hex with any spacing (``68 61 01 ...``, ``686101...``, ``0x68,0x61``), FE preambles
allowed, several frames in one string allowed, of any mix of the three protocols. All three start
with 68, so each frame is told apart by its structure: DL/T 645 has a second 68 at offset 7 and a
sum checksum over 12 + L bytes; DL/T 698.45 has a 14-bit length at offsets 1-2 (bit 14: in kilobytes) and a CRC over its
header; CJ/T 188 has its length at offset 10 and a sum checksum over 13 + L bytes. The first
protocol whose structure and check bytes hold wins (``--protocol`` forces one).

Output: one JSON object per frame per line, or a readable table with ``--pretty``. A frame that
cannot be decoded gets one line on stderr saying exactly what is wrong and where; the frames
around it are still printed, and the exit status is 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meter_gateway.protocols.cjt188 import describe as cjt188_describe
from meter_gateway.protocols.cjt188.errors import ProtocolError as Cjt188Error
from meter_gateway.protocols.cjt188.identifiers import DiOrder
from meter_gateway.protocols.dlt645.describe import describe_frame as dlt645_describe
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.protocols.dlt645.errors import ProtocolError as Dlt645Error
from meter_gateway.protocols.dlt645.frame import parse_frame as dlt645_parse
from meter_gateway.protocols.dlt645.functions import infer_edition
from meter_gateway.protocols.dlt698 import describe as dlt698_describe
from meter_gateway.protocols.dlt698.errors import ProtocolError as Dlt698Error
from meter_gateway.protocols.dlt698.frame import frame_length

_SEPARATORS = re.compile(r"0[xX]|[\s,;:\-]")
PREAMBLE = 0xFE
START = 0x68
_END = 0x16
PROTOCOLS = ("dlt645", "dlt698", "cjt188")
_ERRORS = (Dlt645Error, Dlt698Error, Cjt188Error)


class DecodeError(Exception):
    """Input the user has to fix; the message is the one line printed."""


@dataclass(frozen=True)
class Options:
    edition: Edition | None = None  # DL/T 645: None infers it per frame from the control code
    di_order: DiOrder = "standard"  # CJ/T 188: the byte order of the data identifier


@dataclass(frozen=True)
class _Shape:
    """How one protocol's frame is recognised and measured from its first bytes (68 ...)."""

    name: str
    title: str
    header: int  # bytes needed before the length is known
    length: Callable[[bytes], int]  # total frame length, from at least ``header`` bytes
    plausible: Callable[[bytes], bool]  # the fixed structure holds (before any check bytes)
    valid: Callable[[bytes], bool]  # structure and check bytes hold
    describe: Callable[[bytes, Options], dict[str, Any]]


def _dlt645_valid(raw: bytes) -> bool:
    try:
        dlt645_parse(raw)
    except Dlt645Error:
        return False
    return True


def _dlt645(raw: bytes, options: Options) -> dict[str, Any]:
    frame = dlt645_parse(raw)
    edition = options.edition or infer_edition(frame.control.function)
    if edition is None:
        raise DecodeError(f"control code {frame.control} is not a function of either edition")
    described = dlt645_describe(frame, edition, raw=raw)
    described["edition_source"] = "given" if options.edition else "inferred from the control code"
    return described


def _dlt698(raw: bytes, options: Options) -> dict[str, Any]:
    described = dlt698_describe.describe(raw)
    described.pop("hex", None)
    return described


def _cjt188(raw: bytes, options: Options) -> dict[str, Any]:
    return cjt188_describe.describe_frame(raw, options.di_order)


_SHAPES: dict[str, _Shape] = {
    "dlt645": _Shape(
        "dlt645",
        "DL/T 645",
        10,
        lambda b: 12 + b[9],
        lambda b: b[7] == START,
        _dlt645_valid,
        _dlt645,
    ),
    "dlt698": _Shape(
        "dlt698",
        "DL/T 698.45",
        3,
        frame_length,
        lambda b: frame_length(b) >= 10,  # L counts at least its own 2 bytes, C, AF, SA, CA, HCS and FCS
        dlt698_describe.looks_like_dlt698,
        _dlt698,
    ),
    "cjt188": _Shape(
        "cjt188",
        "CJ/T 188",
        11,
        lambda b: 13 + b[10],
        lambda b: True,
        cjt188_describe.looks_like_cjt188,
        _cjt188,
    ),
}


@dataclass(frozen=True)
class Decoded:
    index: int
    offset: int
    fields: dict[str, Any]


@dataclass(frozen=True)
class Failed:
    index: int
    offset: int
    message: str


def parse_hex(text: str) -> bytes:
    compact = _SEPARATORS.sub("", text)
    if not compact:
        raise DecodeError("no hex digits given")
    bad = re.search(r"[^0-9a-fA-F]", compact)
    if bad:
        raise DecodeError(f"not hex: {bad.group()!r} in the input")
    if len(compact) % 2:
        raise DecodeError(f"odd number of hex digits ({len(compact)}): a byte is missing a digit")
    return bytes.fromhex(compact)


def _candidates(protocol: str | None) -> list[_Shape]:
    return [_SHAPES[protocol]] if protocol else list(_SHAPES.values())


def _measure(data: bytes, pos: int, shapes: list[_Shape]) -> tuple[_Shape, int]:
    """The protocol of the frame at ``pos`` and its length.

    A valid frame of any candidate wins. Failing that, the candidate to blame is the one whose
    length lands on an end byte 16 followed by the end of input or the next frame's FE or 68
    (else the first whose fixed structure fits), so its own decoder names what is wrong.
    """
    fitting: list[tuple[bool, int, _Shape, int]] = []
    for order, shape in enumerate(shapes):
        head = data[pos : pos + shape.header]
        if len(head) < shape.header:
            fitting.append((False, order, shape, len(data) - pos))
            continue
        if not shape.plausible(head):
            continue
        total = shape.length(head)
        if shape.valid(data[pos : pos + total]):
            return shape, total
        end = pos + total
        lands = end <= len(data) and data[end - 1] == _END and (end == len(data) or data[end] in (PREAMBLE, START))
        fitting.append((lands, order, shape, total))
    if not fitting:
        return shapes[0], len(data) - pos
    _, _, shape, total = max(fitting, key=lambda f: (f[0], -f[1]))
    return shape, total


def decode_all(text: str, options: Options | None = None, protocol: str | None = None) -> list[Decoded | Failed]:
    """Every frame in ``text``, decoded or with the one line saying why it could not be.

    Input that is not hex at all raises :class:`DecodeError`. After a bad frame the next one is
    looked for where the bad frame's own length says it ends; bytes that are no frame at all end
    the input (nothing after them can be placed).
    """
    options = options or Options()
    data = parse_hex(text)
    shapes = _candidates(protocol)
    results: list[Decoded | Failed] = []
    pos = 0
    while pos < len(data):
        start = pos
        while pos < len(data) and data[pos] == PREAMBLE:
            pos += 1
        index = len(results) + 1
        if pos == len(data):
            if not results:
                results.append(Failed(index, start, "only FE preamble bytes, no frame"))
            break  # trailing wake-up bytes are harmless
        where = f"at byte {pos}" if results or pos else "at the start"
        if data[pos] != START:
            what = "frame" if protocol is None else f"{_SHAPES[protocol].title} frame"
            results.append(Failed(index, pos, f"not a {what} {where}: found {data[pos]:02X}, expected 68"))
            break
        shape, total = _measure(data, pos, shapes)
        raw = data[pos : pos + total]
        try:
            described = shape.describe(raw, options)
            fields = {"protocol": shape.name} | {k: v for k, v in described.items() if k != "protocol"}
        except (*_ERRORS, DecodeError) as exc:
            results.append(Failed(index, pos, f"{shape.title} frame {where}: {exc}"))
        else:
            results.append(Decoded(index, start, fields))
        pos += total
    return results


def decode(text: str, edition: Edition | None = None, protocol: str | None = None) -> list[dict[str, Any]]:
    """Every frame in ``text`` as a dict; the first frame that cannot be decoded raises DecodeError."""
    out = []
    for result in decode_all(text, Options(edition=edition), protocol):
        if isinstance(result, Failed):
            raise DecodeError(result.message)
        out.append(result.fields)
    return out


def _pretty(fields: dict[str, Any], index: int) -> list[str]:
    title = _SHAPES[fields["protocol"]].title
    what = fields.get("function") or fields.get("service") or ""
    lines = [f"frame {index}: {title} {what}".rstrip()]
    for key, value in fields.items():
        if key in {"protocol", "function", "service"}:
            continue
        if key == "values" and isinstance(value, list):
            for item in value:
                name = item.get("di") or item.get("oad") or item.get("quantity") or ""
                unit = f" {item['unit']}" if item.get("unit") else ""
                label = item.get("name", "")
                lines.append(f"  {name:<12} {item.get('value')}{unit}  {label}".rstrip())
            continue
        shown = json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list) else value
        lines.append(f"  {key:<16} {shown}")
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="meter-gateway decode",
        description="Decode DL/T 645, DL/T 698.45 and CJ/T 188 frames given as hex "
        "(spaces, FE preambles and several frames of any of them allowed).",
    )
    parser.add_argument("hex", nargs="*", help="frame bytes in hex; reads standard input when omitted")
    parser.add_argument(
        "--protocol",
        choices=["auto", *PROTOCOLS],
        default="auto",
        help="the frames' protocol (default: told apart per frame by its structure)",
    )
    parser.add_argument(
        "--edition",
        choices=["auto", "2007", "1997"],
        default="auto",
        help="DL/T 645: the meter's edition (default: inferred from each frame's control code)",
    )
    parser.add_argument(
        "--di-order",
        choices=["standard", "swapped"],
        default="standard",
        help="CJ/T 188: data identifier byte order (standard: 90 1F as the standard writes it; swapped: 1F 90)",
    )
    parser.add_argument("--pretty", action="store_true", help="a readable table instead of JSON lines")
    args = parser.parse_args(argv)
    text = " ".join(args.hex) if args.hex else sys.stdin.read()
    options = Options(
        edition=None if args.edition == "auto" else Edition.parse(args.edition),
        di_order=args.di_order,
    )
    try:
        results = decode_all(text, options, None if args.protocol == "auto" else args.protocol)
    except DecodeError as exc:
        print(f"meter-gateway decode: {exc}", file=sys.stderr)
        return 2
    several = len(results) > 1
    status = 0
    for result in results:
        if isinstance(result, Failed):
            prefix = f"frame {result.index}: " if several else ""
            print(f"meter-gateway decode: {prefix}{result.message}", file=sys.stderr)
            status = 2
        elif args.pretty:
            print("\n".join(_pretty(result.fields, result.index)) + "\n")
        else:
            print(json.dumps(result.fields, ensure_ascii=False))
    sys.stdout.flush()
    return status

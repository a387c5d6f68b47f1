"""`meter-gateway decode HEX...`: decode DL/T 645 frames pasted from a bus sniffer.

Input is hex with any spacing (``68 61 01 ...``, ``686101...``, ``0x68,0x61``), FE preambles
allowed, several frames in one string allowed. Output: one JSON object per frame per line, or a
readable table with ``--pretty``. Invalid input exits 2 with one line on stderr saying exactly
what is wrong and where.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from meter_gateway.protocols.dlt645.describe import describe_frame
from meter_gateway.protocols.dlt645.edition import Edition
from meter_gateway.protocols.dlt645.errors import ProtocolError
from meter_gateway.protocols.dlt645.frame import OVERHEAD, PREAMBLE, START, Frame, parse_frame
from meter_gateway.protocols.dlt645.functions import infer_edition

_SEPARATORS = re.compile(r"0[xX]|[\s,;:\-]")


class DecodeError(Exception):
    """Input the user has to fix; the message is the one line printed."""


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


def split_frames(data: bytes) -> list[tuple[int, bytes, Frame]]:
    """Cut ``data`` into frames by their length bytes; (offset, raw bytes incl. preamble, frame)."""
    frames: list[tuple[int, bytes, Frame]] = []
    pos = 0
    while pos < len(data):
        start = pos
        while pos < len(data) and data[pos] == PREAMBLE:
            pos += 1
        if pos == len(data):
            if not frames:
                raise DecodeError("only FE preamble bytes, no frame")
            break  # trailing wake-up bytes are harmless
        where = f"at byte {pos}" if frames or pos else "at the start"
        if data[pos] != START:
            raise DecodeError(f"not a DL/T 645 frame {where}: found {data[pos]:02X}, expected 68")
        total = OVERHEAD + data[pos + 9] if pos + 9 < len(data) else len(data) - pos + 1
        chunk = data[pos : pos + total]
        try:
            frame = parse_frame(chunk)
        except ProtocolError as exc:
            prefix = f"frame {len(frames) + 1} ({where}): " if frames else ""
            raise DecodeError(prefix + str(exc)) from None
        frames.append((start, data[start : pos + total], frame))
        pos += total
    return frames


def decode(text: str, edition: Edition | None = None) -> list[dict[str, Any]]:
    """Decode every frame in ``text``; ``edition`` None infers it per frame from the control code."""
    out = []
    for index, (_, raw, frame) in enumerate(split_frames(parse_hex(text)), start=1):
        chosen = edition or infer_edition(frame.control.function)
        if chosen is None:
            raise DecodeError(f"frame {index}: control code {frame.control} is not a function of either edition")
        try:
            described = describe_frame(frame, chosen, raw=raw)
        except ProtocolError as exc:
            raise DecodeError(f"frame {index}: {exc}") from None
        described["edition_source"] = "given" if edition else "inferred from the control code"
        out.append(described)
    return out


def _pretty(frames: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for index, frame in enumerate(frames, start=1):
        lines.append(f"frame {index}: DL/T 645-{frame['edition']} {frame['function']} ({frame['direction']})")
        for key, value in frame.items():
            if key in {"edition", "function", "direction", "edition_source"}:
                continue
            if key == "values":
                for item in value:
                    quantity = f" [{item['quantity']}]" if "quantity" in item else ""
                    unit = f" {item['unit']}" if "unit" in item else ""
                    lines.append(f"  {item['di']:<12} {item['value']}{unit}  {item['name']}{quantity}")
                continue
            shown = json.dumps(value) if isinstance(value, dict | list) else value
            lines.append(f"  {key:<16} {shown}")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="meter-gateway decode",
        description="Decode DL/T 645 frames given as hex (spaces, FE preambles and several frames allowed).",
    )
    parser.add_argument("hex", nargs="*", help="frame bytes in hex; reads standard input when omitted")
    parser.add_argument(
        "--edition",
        choices=["auto", "2007", "1997"],
        default="auto",
        help="the meter's edition (default: inferred from each frame's control code)",
    )
    parser.add_argument("--pretty", action="store_true", help="a readable table instead of JSON lines")
    args = parser.parse_args(argv)
    text = " ".join(args.hex) if args.hex else sys.stdin.read()
    edition = None if args.edition == "auto" else Edition.parse(args.edition)
    try:
        frames = decode(text, edition)
    except DecodeError as exc:
        print(f"meter-gateway decode: {exc}", file=sys.stderr)
        return 2
    if args.pretty:
        print(_pretty(frames))
    else:
        for frame in frames:
            print(json.dumps(frame, ensure_ascii=False))
    return 0

"""`meter-gateway demo`: the main job on embedded defaults.

Decodes a set of real DL/T 645 frames (public captures: an energy read and its reply, a negative
power reply, a status word 3 with the relay open, a remote-control close permit, an abnormal
reply) and prints them as a field engineer's table.
"""

from __future__ import annotations

import argparse

from gateway import decode_cmd

SAMPLE_FRAMES = (
    "68 61 01 00 00 00 00 68 11 04 33 33 34 33 14 16",
    "FE FE FE FE 68 61 01 00 00 00 00 68 91 08 33 33 34 33 59 33 33 33 8A 16",
    "FE FE FE FE 68 61 01 00 00 00 00 68 91 07 33 33 36 35 45 58 B3 EB 16",
    "68 61 10 01 30 12 15 68 91 06 36 38 33 37 83 33 BE 16",
    "68 61 10 01 30 12 15 68 1C 10 35 6A 39 35 34 33 33 33 4E 33 33 33 33 63 45 CC 2D 16",
    "68 12 00 00 00 10 20 68 D1 01 35 19 16",
)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="meter-gateway demo", description=__doc__)
    parser.parse_args(argv)
    return decode_cmd.main(["--pretty", " ".join(SAMPLE_FRAMES)])

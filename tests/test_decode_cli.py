"""`meter-gateway decode` on a mix of DL/T 645, DL/T 698.45 and CJ/T 188 frames (the public vectors)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from meter_gateway.gateway.cli import decode_cmd
from meter_gateway.protocols.dlt698.crc import crc16
from meter_gateway.protocols.dlt698.frame import Control, Frame, ServerAddress
from tests.plugins.vectors import load_vectors

DLT645 = load_vectors("dlt645")
DLT698 = load_vectors("dlt698")
CJT188 = load_vectors("cjt188")
CJT188_GOOD = [v for v in CJT188 if v["checksum_ok"]]
CJT188_BAD = [v for v in CJT188 if not v["checksum_ok"]]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "meter_gateway.gateway.cli", "decode", *args]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def _di_order(vector: dict[str, Any]) -> str:
    return "swapped" if vector["data_hex"][:4] in ("1F90", "0A81") else "standard"


@pytest.mark.parametrize("vector", DLT698, ids=[v["id"] for v in DLT698])
def test_every_dlt698_vector_is_told_apart_and_decoded(vector: dict[str, Any]) -> None:
    (fields,) = decode_cmd.decode(vector["hex"])
    assert fields["protocol"] == "dlt698"
    if vector.get("fragment"):  # a link-layer fragment carries part of an APDU, no service of its own
        assert fields["fragment"] is True
    else:
        assert fields["service"] == vector["service"]
    if "choice" in vector:
        assert fields["choice"] == vector["choice"]
    if "server_address" in vector:
        assert fields["server_address"] == vector["server_address"]
    if "oads" in vector:
        assert fields["oads"] == vector["oads"]


@pytest.mark.parametrize("vector", CJT188_GOOD, ids=[v["id"] for v in CJT188_GOOD])
def test_every_good_cjt188_vector_is_told_apart_and_decoded(vector: dict[str, Any]) -> None:
    results = decode_cmd.decode_all(vector["hex"], decode_cmd.Options(di_order=_di_order(vector)))  # type: ignore[arg-type]
    (result,) = results
    assert isinstance(result, decode_cmd.Decoded)
    assert result.fields["protocol"] == "cjt188"
    assert result.fields["address"] == vector["address"]
    assert result.fields["meter_type"] == vector["meter_type"]


@pytest.mark.parametrize("vector", CJT188_BAD, ids=[v["id"] for v in CJT188_BAD])
def test_a_bad_cjt188_checksum_is_named_as_such(vector: dict[str, Any]) -> None:
    proc = cli(vector["hex"])
    assert proc.returncode == 2
    assert proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert "CJ/T 188 frame" in line
    assert "checksum expected" in line


def test_all_three_protocols_in_one_string_through_the_cli() -> None:
    vectors = DLT645[:5] + DLT698[:5] + [v for v in CJT188_GOOD if _di_order(v) == "standard"]
    proc = cli(" ".join(v["hex"] for v in vectors))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    expected = ["dlt645"] * 5 + ["dlt698"] * 5 + ["cjt188"] * (len(vectors) - 10)
    assert [line["protocol"] for line in lines] == expected


def test_one_bad_frame_does_not_suppress_the_others() -> None:
    bad = CJT188_BAD[0]["hex"]
    proc = cli(DLT645[0]["hex"], bad, DLT698[0]["hex"])
    assert proc.returncode == 2
    assert [json.loads(line)["protocol"] for line in proc.stdout.splitlines()] == ["dlt645", "dlt698"]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("meter-gateway decode: frame 2: CJ/T 188 frame at byte")
    assert "checksum expected" in line


def test_forcing_a_protocol_blames_that_protocol() -> None:
    proc = cli("--protocol", "dlt698", DLT645[0]["hex"])
    assert proc.returncode == 2
    assert "DL/T 698.45 frame" in proc.stderr


def test_pretty_prints_every_protocol() -> None:
    proc = cli("--pretty", DLT645[0]["hex"], DLT698[0]["hex"], CJT188_GOOD[0]["hex"])
    assert proc.returncode == 0, proc.stderr
    assert "frame 1: DL/T 645" in proc.stdout
    assert "frame 2: DL/T 698.45" in proc.stdout
    assert "frame 3: CJ/T 188" in proc.stdout


def _kilobyte_frame() -> bytes:
    """A 1,026-byte GET-Response whose length field counts in kilobytes (bit 14 set, 1 KB), as a
    meter may send a long record: our encoder writes byte lengths only, so the L field and both
    check sequences are rewritten here."""
    address = ServerAddress.parse("000000000011")
    n = 1024 - 9 - len(address.wire) - 14  # the octet-string's size that makes L exactly 1,024
    apdu = bytes.fromhex("850101 40010200 01 0982") + n.to_bytes(2, "big") + bytes(i % 256 for i in range(n)) + b"\0\0"
    raw = bytearray(Frame(Control(from_server=True, prm=False), address, 0, apdu).encode())
    assert len(raw) == 1026
    raw[1:3] = (0x4001).to_bytes(2, "little")
    hcs_at = 6 + len(address.wire)
    raw[hcs_at : hcs_at + 2] = crc16(bytes(raw[1:hcs_at])).to_bytes(2, "little")
    raw[-3:-1] = crc16(bytes(raw[1:-3])).to_bytes(2, "little")
    return bytes(raw)


def test_a_dlt698_length_in_kilobytes_is_measured_as_such() -> None:
    frame = _kilobyte_frame()
    proc = cli(frame.hex() + " " + DLT645[0]["hex"])  # the next frame starts where the 1 KB one ends
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["protocol"] for line in lines] == ["dlt698", "dlt645"]
    assert lines[0]["service"] == "GET-Response"

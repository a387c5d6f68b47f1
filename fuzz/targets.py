"""The fuzz targets: what runs on one input, what may escape, and Hypothesis strategies for base
inputs that are close to valid (so mutations reach deep into the parsers).

An input is ``(context, data)``: ``data`` is the bytes that get mutated, ``context`` says how to
interpret them (which Modbus framing and read request, for instance) and is never mutated.
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from hypothesis import strategies as st

Runner = Callable[[Any, bytes, random.Random], None]


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    base: st.SearchStrategy[tuple[Any, bytes]]
    run: Runner
    allowed: tuple[type[BaseException], ...]  # the documented errors; anything else is a crash


class InvariantBroken(AssertionError):
    """A target's own check failed (a crash, like an unexpected exception)."""


class Guard:
    """Runs the entry points one by one, so an allowed error in one does not hide a crash in another."""

    def __init__(self, allowed: tuple[type[BaseException], ...]) -> None:
        self.allowed = allowed
        self.crashes: list[Exception] = []

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except self.allowed:
            return None
        except Exception as exc:  # what the target is looking for
            self.crashes.append(exc)
            return None


# -- DL/T 645 ------------------------------------------------------------------------------------------

# Control bytes of real traffic (requests and normal / abnormal / follow-up replies, both editions)
DLT_CONTROLS = (0x11, 0x12, 0x13, 0x14, 0x1C, 0x08, 0x01, 0x02, 0x04, 0x91, 0xB1, 0x92, 0xB2, 0xD1, 0xD2,
                0x93, 0xD3, 0x94, 0xD4, 0x9C, 0xDC, 0x81, 0xA1, 0x82, 0xA2, 0xC1, 0x84, 0xC4, 0x88)  # fmt: skip
DLT_DIS = (0x00010000, 0x0001FF00, 0x02010100, 0x0201FF00, 0x02800002, 0x04000101, 0x04000102, 0x05060101,
           0x03300D00, 0x04000503, 0x9010, 0x901F, 0xB611, 0xC010)  # fmt: skip


@st.composite
def _dlt_stream(draw: st.DrawFn) -> tuple[Any, bytes]:
    from meter_gateway.protocols.dlt645.frame import Address, Control, Frame

    parts: list[bytes] = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            parts.append(draw(st.binary(max_size=24)))  # noise or FE runs between frames
        address = Address(draw(st.binary(min_size=6, max_size=6)))
        control = Control.from_byte(draw(st.sampled_from(DLT_CONTROLS) | st.integers(0, 255)))
        di = draw(st.sampled_from(DLT_DIS))
        di_bytes = di.to_bytes(4 if di > 0xFFFF else 2, "little")
        data = (di_bytes + draw(st.binary(max_size=60)))[: draw(st.integers(0, 200))]
        parts.append(Frame(address, control, data).encode(preamble=draw(st.integers(0, 4))))
    return draw(st.sampled_from((200, 255))), b"".join(parts)


def repair_dlt(data: bytes) -> bytes:
    """``data`` with the checksum and end byte of every frame its length bytes outline made right
    again, so a mutation inside a frame reaches parse_message and the catalogue instead of being
    dropped as bad_checksum."""
    buf = bytearray(data)
    pos = buf.find(0x68)
    while pos >= 0 and pos + 10 <= len(buf):
        end = pos + 12 + buf[pos + 9]
        if buf[pos + 7] != 0x68 or end > len(buf):
            pos = buf.find(0x68, pos + 1)
            continue
        buf[end - 2 : end] = bytes((sum(buf[pos : end - 2]) & 0xFF, 0x16))
        pos = buf.find(0x68, end)
    return bytes(buf)


def _run_dlt(max_data_length: int, data: bytes, rng: random.Random) -> None:
    from meter_gateway.protocols.dlt645.catalogue import default_catalogue
    from meter_gateway.protocols.dlt645.deframer import Deframer
    from meter_gateway.protocols.dlt645.edition import Edition
    from meter_gateway.protocols.dlt645.errors import ProtocolError
    from meter_gateway.protocols.dlt645.frame import Frame, parse_frame
    from meter_gateway.protocols.dlt645.messages import ReadReply, parse_message

    if rng.random() < 0.5:
        data = repair_dlt(data)
    catalogue = default_catalogue()
    deframer = Deframer(max_data_length)
    frames: list[Frame] = []
    pos = 0
    while pos < len(data):  # arbitrary chunking, as bytes trickle in from a serial port
        step = rng.choice((1, 2, 7, 13, 64, len(data)))
        for event in deframer.feed(data[pos : pos + step]):
            if isinstance(event, Frame):
                if len(event.data) > max_data_length:
                    raise InvariantBroken(f"frame with {len(event.data)} data bytes from a {max_data_length} deframer")
                frames.append(event)
        pos += step
        if deframer.buffered > deframer.buffer_limit:
            raise InvariantBroken(f"deframer holds {deframer.buffered} > {deframer.buffer_limit} bytes")
    for frame in frames:
        for edition in (Edition.DLT645_2007, Edition.DLT645_1997):
            try:
                message = parse_message(frame, edition)
            except ProtocolError:
                continue
            if isinstance(message, ReadReply) and message.value:
                with contextlib.suppress(ProtocolError):
                    catalogue.decode(edition, message.di, message.value)
    with contextlib.suppress(ProtocolError):
        parse_frame(data)


def _dlt645() -> Target:
    from meter_gateway.protocols.dlt645.errors import ProtocolError

    return Target(
        "dlt645",
        "streaming Deframer (random chunking) + parse_message (both editions) + catalogue decode of read "
        "replies + parse_frame",
        _dlt_stream(),
        _run_dlt,
        (ProtocolError,),
    )


# -- Modbus ---------------------------------------------------------------------------------------------


@functools.cache
def _modbus_requests() -> tuple[Any, ...]:
    """Every read request the shipped Modbus models plan (what ModbusMeter.read would send)."""
    from meter_gateway.drivers.meter_models import ModbusModel, load_model
    from meter_gateway.drivers.modbus import plan_reads

    out = []
    for name in ("eastron-sdm630", "chint-dtsu666", "sim-3ph"):
        model = load_model(name)
        assert isinstance(model, ModbusModel)
        for variant in (None, *model.variants):
            out.extend(
                plan_reads(
                    model.points_for(model.quantities, variant),
                    max_registers=model.max_registers_per_read,
                    max_bits=model.max_bits_per_read,
                    max_gap=model.max_gap,
                )
            )
    return tuple(out)


def _framer(framing: str) -> Any:
    from pymodbus.framer import FramerRTU, FramerSocket

    from meter_gateway.drivers.modbus import ReplyDecoder

    decoder = ReplyDecoder(False)  # client side, as drivers/modbus.py installs it on its clients
    return FramerRTU(decoder) if framing == "rtu" else FramerSocket(decoder)


RTU_MAX_COUNT = 16
_REGISTER_EDGES = (0, 1, 0x7FFF, 0x8000, 0xFFFF, 0x7F80, 0x7FC0, 0xFF80, 0x7FF0, 0xFFF8)  # +/-inf, NaN halves


@st.composite
def _modbus_reply(draw: st.DrawFn) -> tuple[Any, bytes]:
    requests = _modbus_requests()
    framing = draw(st.sampled_from(("rtu", "socket")))
    # RTU: only reads of up to RTU_MAX_COUNT registers. pymodbus' RTU scan of a corrupted frame is
    # cubic in its length (pure-Python CRC for every start and end), ~5 ms for a 125-register
    # reply, which would cap a run at ~200 executions/s; MBAP framing covers the long replies.
    usable = [i for i, r in enumerate(requests) if framing == "socket" or r.count <= RTU_MAX_COUNT]
    index = draw(st.sampled_from(usable))
    request = requests[index]
    unit = draw(st.sampled_from((1, 2, 247)))
    tid = draw(st.integers(1, 0xFFFF))
    kind = draw(st.sampled_from(("ok", "ok", "ok", "exception", "short", "other_function")))
    function = request.function
    if kind == "exception":
        pdu = bytes((function | 0x80, draw(st.integers(0, 255))))
    elif request.function in (1, 2):
        nbytes = (request.count + 7) // 8 + (1 if kind == "short" else 0) * -1
        pdu = bytes((function, max(nbytes, 0))) + draw(st.binary(min_size=max(nbytes, 0), max_size=max(nbytes, 0)))
    else:
        count = request.count - (1 if kind == "short" else 0)
        regs = draw(st.lists(st.sampled_from(_REGISTER_EDGES) | st.integers(0, 0xFFFF), min_size=count, max_size=count))
        pdu = bytes((function if kind != "other_function" else 4 if function == 3 else 3, 2 * count))
        pdu += b"".join(r.to_bytes(2, "big") for r in regs)
    frame = _framer(framing).encode(pdu, unit, tid)
    return (framing, index, unit, tid), bytes(frame)


def _run_modbus(context: Any, data: bytes, rng: random.Random) -> None:
    """pymodbus' framer and PDU decoder as drivers/modbus.py's clients use them, then the checks
    ModbusLink._transact / read_registers / read_bits make on the reply, then decode_block."""
    from meter_gateway.drivers.errors import BadReply, MeterRefused
    from meter_gateway.drivers.modbus import decode_block

    framing, index, unit, tid = context
    request = _modbus_requests()[index]
    framer = _framer(framing)
    expect_tid = tid if framing == "socket" else 0  # pymodbus numbers RTU transactions 0
    buffer, pos, response = b"", 0, None
    while pos < len(data) and response is None:  # as pymodbus' transport buffers what arrives, in pieces
        # mostly whole replies; sometimes in serial-sized pieces (pymodbus' RTU scan is cubic in the
        # bytes buffered, so byte-by-byte feeding would cap the rate at a few hundred executions/s)
        step = len(data) if rng.random() < 0.9 else 16
        buffer += data[pos : pos + step]
        pos += step
        used, response = framer.handleFrame(buffer, unit, expect_tid)
        buffer = buffer[used:]
    if response is None:
        return  # still waiting: the client's timeout turns this into NoAnswer
    if response.isError():
        if response.function_code != request.function | 0x80:
            raise BadReply("exception reply to another function")
        raise MeterRefused("exception reply", code=int(getattr(response, "exception_code", 0)), reasons=("x",))
    if response.function_code != request.function:
        raise BadReply("reply of another function")
    values: bytes | list[bool]
    if request.function in (1, 2):
        bits = [bool(b) for b in response.bits]
        if len(bits) < request.count or len(bits) >= request.count + 8:
            raise BadReply("short bit reply")
        values = bits[: request.count]
    else:
        registers = list(response.registers)
        if len(registers) != request.count:
            raise BadReply("register count")
        values = struct.pack(f">{len(registers)}H", *registers)  # the register bytes a read decodes
    readings = decode_block(request, values, meter_id="m1", gateway_time=1.0, slot=0.0)
    if len(readings) != len(request.points):
        raise InvariantBroken(f"{len(readings)} readings for {len(request.points)} points")


def _modbus() -> Target:
    from pymodbus.exceptions import ModbusException

    from meter_gateway.drivers.errors import BadReply, MeterRefused

    return Target(
        "modbus",
        "pymodbus FramerRTU/FramerSocket + drivers.modbus.ReplyDecoder (as drivers/modbus.py's clients), "
        "ModbusLink's reply checks, decode_block over every read the shipped models plan",
        _modbus_reply(),
        _run_modbus,
        (ModbusException, BadReply, MeterRefused),
    )


# -- command envelopes ------------------------------------------------------------------------------------

GATEWAY = "gw-1"
NOW = 1_790_000_000.0

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@functools.cache
def _keys() -> tuple[Any, Any]:
    """A signing key and the gateway's key ring (fixed seed material: reproducible runs)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from meter_gateway.gateway.commands.auth import KeyRing, SigningKey

    ops = SigningKey.ed25519("ops", Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
    shared = SigningKey.hmac_sha256("hq", bytes(range(32, 64)))
    ring = KeyRing([ops.verify_key(["command"]), shared.verify_key(["command", "release"])])
    return (ops, shared), ring


@st.composite
def _envelope(draw: st.DrawFn) -> tuple[Any, bytes]:
    from meter_gateway.gateway.commands.auth import sign_envelope
    from meter_gateway.gateway.commands.envelope import ACTIONS, Action, CommandEnvelope, Params, encode_envelope

    kind = draw(st.sampled_from(("signed", "signed", "fields", "json")))
    if kind == "json":
        return None, json.dumps(draw(_json)).encode()
    ident = st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True)
    meter = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,12}", fullmatch=True)
    action = cast(Action, draw(st.sampled_from(ACTIONS)))
    issued = NOW + draw(st.floats(-100, 100))
    params = None
    if action == "release":
        params = Params(commands=draw(st.lists(ident, min_size=1, max_size=3, unique=True)))
    elif action == "read_now" and draw(st.booleans()):
        params = Params(quantities=["energy.active.import.total"])
    elif action == "reconnect" and draw(st.booleans()):
        params = Params(mode=draw(st.sampled_from(("close_permit", "direct_close"))))
    env = CommandEnvelope(
        v=1,
        id=draw(ident),
        gateway=draw(st.sampled_from((GATEWAY, "gw-2"))),
        meters=[] if action == "release" else draw(st.lists(meter, min_size=1, max_size=4, unique=True)),
        action=action,
        params=params,
        issued_at=issued,
        not_before=issued - 30,
        expires_at=issued + draw(st.floats(1, 100_000)),
        seq=draw(st.integers(0, 2**63 - 1)),
        key_id="ops",
        alg="ed25519",
    )
    signer = draw(st.sampled_from(_keys()[0]))
    payload = encode_envelope(sign_envelope(env, signer))
    if kind == "fields":  # right shape, arbitrary values
        raw = json.loads(payload)
        for field in draw(st.lists(st.sampled_from(sorted(raw)), max_size=3)):
            raw[field] = draw(_json)
        payload = json.dumps(raw).encode()
    return None, payload


def _run_command(context: Any, data: bytes, rng: random.Random) -> None:
    from meter_gateway.gateway.commands.auth import CommandRejected, authenticate
    from meter_gateway.gateway.commands.envelope import decode_envelope, peek_command_id
    from meter_gateway.gateway.uplink.contract import ContractError

    # the three entry points run independently, so a crash in one does not hide another's
    crashes: list[Exception] = []
    peeked: object = None
    try:
        peeked = peek_command_id(data)  # must never raise
    except Exception as exc:
        crashes.append(exc)
    if peeked is not None and not isinstance(peeked, str):
        crashes.append(InvariantBroken("peek_command_id returned a non-string"))
    try:
        decode_envelope(data)
    except ContractError:
        pass
    except Exception as exc:
        crashes.append(exc)
    env = None
    try:
        env = authenticate(
            data, retained=rng.random() < 0.02, gateway_id=GATEWAY, keyring=_keys()[1], now=NOW, max_validity=86_400.0
        )
    except CommandRejected:
        pass
    except Exception as exc:
        crashes.append(exc)
    if env is not None and (env.gateway != GATEWAY or env.expires_at <= NOW):
        crashes.append(InvariantBroken(f"authenticate accepted a command it must refuse: {env}"))
    if crashes:
        raise ExceptionGroup("command entry points", crashes)


def _command() -> Target:
    from meter_gateway.gateway.commands.auth import CommandRejected
    from meter_gateway.gateway.uplink.contract import ContractError

    return Target(
        "command",
        "peek_command_id + decode_envelope + authenticate (Ed25519 and HMAC keys) on signed envelopes, "
        "envelopes with arbitrary field values and arbitrary JSON",
        _envelope(),
        _run_command,
        (CommandRejected, ContractError),
    )


def _dlt698() -> Target:
    from fuzz.dlt698 import target  # its own module: the DL/T 698.45 strategies are long

    return target()


def _cjt188() -> Target:
    from fuzz.cjt188 import target

    return target()


TARGETS: dict[str, Callable[[], Target]] = {
    "dlt645": _dlt645,
    "dlt698": _dlt698,
    "cjt188": _cjt188,
    "modbus": _modbus,
    "command": _command,
}

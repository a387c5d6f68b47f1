"""The MQTT contract between the gateway and the head-end: topic names and JSON payloads.

Pure data and functions (no network): the uplink encodes with it, tests and head-end tools
decode with it. docs/mqtt.md is the prose version; change both together, and bump
CONTRACT_VERSION (which is part of every topic) for any change a consumer could trip on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import msgspec

CONTRACT_VERSION = 1
TOPIC_ROOT = "meter-gateway"
DEFAULT_SHARE_GROUP = "headend"

MeterStateName = Literal["unknown", "online", "degraded", "offline"]
StatusName = Literal["online", "offline"]

# Characters that cannot appear in a topic level we build from an id: level separator,
# wildcards, NUL. A leading "$" would make the topic a broker-internal one.
_FORBIDDEN = frozenset("/+#\x00")


class ContractError(ValueError):
    """A topic or payload does not follow the contract."""


def check_level(kind: str, value: str) -> str:
    """Validate an id used as one topic level (gateway id, meter id, command id)."""
    if not value:
        raise ContractError(f"{kind} must not be empty")
    if value.startswith("$"):
        raise ContractError(f"{kind} {value!r} must not start with '$'")
    bad = _FORBIDDEN.intersection(value)
    if bad:
        raise ContractError(f"{kind} {value!r} contains {''.join(sorted(bad))!r}, not allowed in a topic level")
    if len(value.encode()) > 256:
        raise ContractError(f"{kind} {value[:32]!r}... is longer than 256 bytes")
    return value


class Topics:
    """All topics of one gateway: ``meter-gateway/v1/{gateway_id}/...``."""

    __slots__ = ("base", "gateway_id")

    def __init__(self, gateway_id: str, root: str = TOPIC_ROOT) -> None:
        self.gateway_id = check_level("gateway id", gateway_id)
        self.base = f"{root}/v{CONTRACT_VERSION}/{gateway_id}"

    @property
    def readings(self) -> str:
        return f"{self.base}/readings"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    def meter_state(self, meter_id: str) -> str:
        return f"{self.base}/meters/{check_level('meter id', meter_id)}/state"

    def meter_events(self, meter_id: str) -> str:
        """What a meter sent on its own (reports, logins); QoS 1, not retained."""
        return f"{self.base}/meters/{check_level('meter id', meter_id)}/events"

    @property
    def commands(self) -> str:
        """Inbound remote-control commands (reserved; the filter below also matches sub-levels)."""
        return f"{self.base}/commands"

    @property
    def commands_filter(self) -> str:
        return f"{self.base}/commands/#"

    @property
    def acks(self) -> str:
        """Outbound command acknowledgements (reserved)."""
        return f"{self.base}/acks"


def shared_readings_filter(group: str = DEFAULT_SHARE_GROUP, root: str = TOPIC_ROOT) -> str:
    """Filter for head-end consumers sharing the readings of every gateway (MQTT 5 shared subs)."""
    check_level("share group", group)
    return f"$share/{group}/{root}/v{CONTRACT_VERSION}/+/readings"


# -- payloads ----------------------------------------------------------------------------------


class WireReading(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    """One reading on the wire. Short keys: a batch of a thousand readings goes over cellular."""

    id: str  # deterministic reading id: the head-end dedupes on it
    row: int  # outbox row number (per outbox instance, increasing, never reused)
    meter: str
    qty: str  # quantity name
    value: float | int | str
    unit: str
    gt: float  # gateway time the reading was taken (unix seconds)
    q: int = 0  # quality flags (bits of drivers.reading.Quality)
    mt: float | None = None  # meter's own timestamp when it supplied one
    slot: float | None = None  # start of the poll slot the reading belongs to


class ReadingsBatch(msgspec.Struct, forbid_unknown_fields=False):
    v: int
    gateway: str
    outbox: str  # outbox instance id: row numbers restart when it changes
    first_row: int
    last_row: int
    sent_at: float
    readings: list[WireReading]


class Status(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    v: int
    gateway: str
    state: StatusName
    version: str | None = None
    started_at: float | None = None
    connected_at: float | None = None
    protocol: str | None = None
    reason: str | None = None


class MeterState(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    v: int
    gateway: str
    meter: str
    state: MeterStateName
    since: float
    detail: str | None = None


class MeterEvent(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    """Something a meter sent unasked (DL/T 698.45 REPORT-Notification, a response's
    FollowReport, a terminal's LINK login/logout), as the gateway received it."""

    v: int
    gateway: str
    meter: str
    protocol: str  # the meter's registry protocol, e.g. "dlt698"
    kind: str  # report | follow_report | link
    at: float  # gateway time it was received (unix seconds)
    service: str  # the APDU's name, e.g. "ReportNotificationList"
    apdu: str  # the APDU as received, upper-case hex: the authoritative content
    detail: dict[str, Any] | None = None  # the APDU decoded as `meter-gateway decode` prints it


_encoder = msgspec.json.Encoder()
_batch_decoder = msgspec.json.Decoder(ReadingsBatch)
_status_decoder = msgspec.json.Decoder(Status)
_state_decoder = msgspec.json.Decoder(MeterState)
_event_decoder = msgspec.json.Decoder(MeterEvent)


def encode_reading(reading: WireReading) -> bytes:
    return _encoder.encode(reading)


def encode_readings(readings: Sequence[WireReading]) -> bytes:
    """Readings encoded as they appear in a batch, comma-separated (no brackets): one call for
    one read's readings, stored by the outbox and spliced into batches as is."""
    return _encoder.encode(readings)[1:-1]


_wire_list_decoder = msgspec.json.Decoder(list[WireReading])


def decode_readings(encoded: bytes) -> list[WireReading]:
    """The readings of an ``encode_readings`` fragment."""
    return _wire_list_decoder.decode(b"[" + encoded + b"]")


def encode_batch(
    *,
    gateway_id: str,
    outbox: str,
    first_row: int,
    last_row: int,
    sent_at: float,
    encoded_readings: Sequence[bytes],
) -> bytes:
    """Assemble a readings batch from readings already encoded with ``encode_reading``.

    Encoding readings one by one lets the uplink cut batches at an exact byte size.
    """
    head = _encoder.encode(
        {
            "v": CONTRACT_VERSION,
            "gateway": gateway_id,
            "outbox": outbox,
            "first_row": first_row,
            "last_row": last_row,
            "sent_at": sent_at,
        }
    )
    return b"".join((head[:-1], b',"readings":[', b",".join(encoded_readings), b"]}"))


# Bytes a batch adds around its readings, with room for long ids and numbers.
BATCH_OVERHEAD = 160


def decode_batch(payload: bytes) -> ReadingsBatch:
    try:
        batch = _batch_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise ContractError(f"bad readings batch: {exc}") from None
    if batch.v != CONTRACT_VERSION:
        raise ContractError(f"readings batch version {batch.v}, expected {CONTRACT_VERSION}")
    return batch


def encode_status(status: Status) -> bytes:
    return _encoder.encode(status)


def decode_status(payload: bytes) -> Status:
    try:
        return _status_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise ContractError(f"bad status: {exc}") from None


def encode_meter_state(state: MeterState) -> bytes:
    check_level("meter id", state.meter)
    return _encoder.encode(state)


def decode_meter_state(payload: bytes) -> MeterState:
    try:
        return _state_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise ContractError(f"bad meter state: {exc}") from None


def encode_meter_event(event: MeterEvent) -> bytes:
    check_level("meter id", event.meter)
    return _encoder.encode(event)


def decode_meter_event(payload: bytes) -> MeterEvent:
    try:
        return _event_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise ContractError(f"bad meter event: {exc}") from None


def reading_ids(batches: Iterable[ReadingsBatch]) -> list[str]:
    """All reading ids of some batches, in order (duplicates kept): what a consumer dedupes."""
    return [r.id for b in batches for r in b.readings]

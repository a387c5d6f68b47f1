"""The DL/T 698.45 ``ProtocolError`` family.

The peer's garbage (:class:`RemoteProtocolError`) and our own misuse of the API
(:class:`LocalProtocolError`) are different types, so a caller can count the first and fix the
second. Nothing else escapes a parser.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of every error raised by ``protocols.dlt698``."""


class RemoteProtocolError(ProtocolError):
    """Bytes received from the peer are not a valid frame, APDU or A-XDR value."""


class LocalProtocolError(ProtocolError):
    """The caller asked for something that cannot be encoded (bad address, value out of range...)."""

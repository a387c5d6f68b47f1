"""The simulated DL/T 698.45 meters' security: a documented TEST-ONLY scheme, not ESAM.

Real meters secure SECURITY-Request/Response (DL/T 698.45-2017 clause 6.3.13, Appendix G) with
the State Grid ESAM: a secure element holding SM4 keys, session keys negotiated at CONNECT,
counters and certificates. None of that is public or simulated here. The simulator needs only
*some* scheme with the same shape, so that a test can show that a meter refuses a plaintext or
forged remote-control command and accepts a properly protected one. This one is deliberately
simple and must never be mistaken for a real meter's:

* every value is HMAC-SHA256 with the meter's ``security_key`` (from the simulator config);
* the MAC of a plaintext response to a SECURITY-Request with verification RN is
  ``HMAC(K, "RN" || rn || response APDU)[:4]``;
* a ciphertext request carries verification SID_MAC (SID, additional data, MAC): the APDU is
  XORed with the keystream ``HMAC(K, "KS" || SID || extra || block counter)`` (32-byte blocks,
  counter 4 bytes big-endian) and the MAC is ``HMAC(K, "RQ" || SID || extra || ciphertext)[:4]``;
* the ciphertext response uses the same keystream with label ``"KR"`` and
  ``HMAC(K, "RS" || SID || extra || ciphertext)[:4]`` as its MAC.

There is no replay protection (a real ESAM counter would add it). The gateway's product code
never uses this module: it lives with the simulators and their tests only.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

from meter_gateway.protocols.dlt698.apdu import SecurityRequest, SecurityResponse, Verification
from meter_gateway.protocols.dlt698.frame import Frame

DEFAULT_KEY: Final = bytes(range(16))
MAC_SIZE: Final = 4


class SecurityError(ValueError):
    """A MAC that does not verify, or a SECURITY APDU this scheme cannot open."""


class TestOnlySecurity:
    """The scheme above with one key. See the module docstring: for simulators and tests only."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, key: bytes = DEFAULT_KEY) -> None:
        if not key:
            raise ValueError("the test-only security key must not be empty")
        self.key = bytes(key)

    def _hmac(self, *parts: bytes) -> bytes:
        return hmac.new(self.key, b"".join(parts), hashlib.sha256).digest()

    def _xor(self, label: bytes, sid: int, extra: bytes, data: bytes) -> bytes:
        head = sid.to_bytes(4, "big") + extra
        stream = bytearray()
        counter = 0
        while len(stream) < len(data):
            stream += self._hmac(label, head, counter.to_bytes(4, "big"))
            counter += 1
        return bytes(a ^ b for a, b in zip(data, stream, strict=False))

    def rn_mac(self, rn: bytes, apdu: bytes) -> bytes:
        """The MAC a meter adds to a plaintext response for random number ``rn``."""
        return self._hmac(b"RN", rn, apdu)[:MAC_SIZE]

    def seal_request(self, apdu: bytes, sid: int, extra: bytes = b"") -> SecurityRequest:
        """A ciphertext SECURITY-Request carrying ``apdu`` (what a master holding the key sends)."""
        cipher = self._xor(b"KS", sid, extra, apdu)
        mac = self._hmac(b"RQ", sid.to_bytes(4, "big"), extra, cipher)[:MAC_SIZE]
        verification = Verification(0, sid=sid, sid_extra=extra, mac=mac)
        return SecurityRequest(data=cipher, encrypted=True, verification=verification)

    def open_request(self, request: SecurityRequest) -> bytes:
        """The plaintext APDU of a ciphertext request; SecurityError when its MAC is wrong."""
        v = request.verification
        if not request.encrypted or v.kind != 0:
            raise SecurityError("not a ciphertext request with SID_MAC")
        mac = self._hmac(b"RQ", v.sid.to_bytes(4, "big"), v.sid_extra, request.data)[:MAC_SIZE]
        if not hmac.compare_digest(mac, v.mac):
            raise SecurityError("SID_MAC does not verify")
        return self._xor(b"KS", v.sid, v.sid_extra, request.data)

    def seal_response(self, apdu: bytes, sid: int, extra: bytes = b"") -> SecurityResponse:
        cipher = self._xor(b"KR", sid, extra, apdu)
        mac = self._hmac(b"RS", sid.to_bytes(4, "big"), extra, cipher)[:MAC_SIZE]
        return SecurityResponse(data=cipher, encrypted=True, mac=mac)

    def open_response(self, response: SecurityResponse, sid: int, extra: bytes = b"") -> bytes:
        """The plaintext APDU of a ciphertext response to a request sealed with ``sid``."""
        if not response.encrypted or response.data is None or response.mac is None:
            raise SecurityError("not a ciphertext response with a MAC")
        mac = self._hmac(b"RS", sid.to_bytes(4, "big"), extra, response.data)[:MAC_SIZE]
        if not hmac.compare_digest(mac, response.mac):
            raise SecurityError("response MAC does not verify")
        return self._xor(b"KR", sid, extra, response.data)

    def sealed(self, request: Frame, sid: int, extra: bytes = b"") -> Frame:
        """``request`` with its APDU replaced by the sealed SECURITY-Request (a test helper)."""
        wrapped = self.seal_request(request.apdu, sid, extra).encode()
        return Frame(request.control, request.address, request.client, wrapped)


__all__ = ["DEFAULT_KEY", "SecurityError", "TestOnlySecurity"]

"""HCS and FCS: CRC-16/X-25 (DL/T 698.45-2017 Appendix A, "校验算法").

Reflected polynomial 0x1021 (0x8408 reversed), initial value 0xFFFF, final XOR 0xFFFF, sent least
significant byte first; ``crc16(b"123456789") == 0x906E``. ``crcmod`` builds the table-driven
function once (with its C extension when installed), which keeps the deframer's hot path cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import crcmod.predefined

# crcmod's function takes any bytes-like object (a memoryview too) and runs in C when its
# extension is installed: it is used as is, with no Python-level wrapper on the deframer's path.
crc16: Final[Callable[[bytes | bytearray | memoryview], int]] = crcmod.predefined.mkCrcFun("x-25")
"""The CRC-16/X-25 of ``data`` (HCS over the header, FCS over the whole frame)."""

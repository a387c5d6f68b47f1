"""Function codes (control byte D5..D0) of CJ/T 188.

CJ/T 188-2004 clause 6.2.4, Figure 2 ("控制码 C"): 000000 reserved, 000001 read data, 000100
write data, 001001 read key version, 000011 read address, 010101 write address, 010110 write
motor-sync data (置表底数), 1XXXXX manufacturer-defined. A reply sets D7 (81H, 83H, 84H, 89H,
95H, 96H) and an abnormal reply also D6 (C1H ...). Function/DI pairs: the summary table at
cnblogs.com/flyingcloude/p/8136593.html ("智能水表188协议汇总") and public implementations
(cj188.h in github.com/xijunzhou/sdqr_energy_node_class-20180705, Src/meter/cj188.h).
"""

from __future__ import annotations

import enum


class Function(enum.IntEnum):
    READ_DATA = 0x01
    READ_ADDRESS = 0x03
    WRITE_DATA = 0x04
    READ_KEY_VERSION = 0x09
    WRITE_ADDRESS = 0x15
    WRITE_SYNC_DATA = 0x16


def function_name(code: int) -> str:
    """``read-data``, ``write-address`` ...; ``vendor-XX`` for 1XXXXX codes, ``unknown-XX`` otherwise."""
    try:
        return Function(code).name.lower().replace("_", "-")
    except ValueError:
        return f"vendor-{code:02X}" if code & 0x20 else f"unknown-{code:02X}"

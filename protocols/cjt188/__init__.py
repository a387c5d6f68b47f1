"""CJ/T 188 (户用计量仪表数据传输技术条件) codec: water, gas and heat meters. Pure, sans-I/O.

Bytes in, frames and messages out, and back; no asyncio, sockets, serial ports, clocks or
randomness (times are passed in). Modules, lowest layer first:

``errors``       the ``ProtocolError`` family (remote garbage vs local misuse)
``frame``        ``68 T A0..A6 C L DATA CS 16``: :class:`~.frame.Frame`, :func:`~.frame.parse_frame`
``deframer``     streaming :class:`~.deframer.Deframer` (chunks in, frames and discards out)
``functions``    control-code functions (read data, read address, write data ...)
``identifiers``  data identifiers (DI) on the wire, and the ``di_order`` setting
``formats``      BCD numbers, unit codes, times, the status word ST
``catalogue``    the DI tables of ``data/cjt188.toml``: decode and encode data fields
``messages``     requests and replies of both sides, :func:`~.messages.parse_message`
``describe``     frame -> JSON-friendly dict for the decode CLI; :func:`~.describe.looks_like_cjt188`

Clause references are to CJ/T 188-2004 (clause 6 data link layer, clause 7 data identifiers);
CJ/T 188-2018 keeps this frame and these identifiers (its clauses 6 and 8).
"""

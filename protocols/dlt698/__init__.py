"""Sans-I/O DL/T 698.45-2017 codec: link frames, streaming deframer, A-XDR data, APDU services.

Nothing here does I/O, reads a clock or draws random bytes: times and random numbers are passed
in. Module map:

``errors``     the ProtocolError family (Remote vs Local)
``crc``        HCS/FCS (CRC-16/X-25, Appendix A)
``frame``      link frame, control byte, server address, fragment header (clause 5)
``deframer``   byte stream -> frames/discards, link fragment reassembly (clause 5)
``axdr``       Data types and A-XDR codec (clauses 6.3.1-6.3.3)
``apdu``       APDU services (clauses 6.3.4-6.3.16)
``dar``        DAR result codes (clause 6.3.3, DAR)
``catalogue``  OAD catalogue (chapter 7, Appendix E/F) loaded from ``data/oads.toml``
``requests``   builders for what a gateway (client) sends
``describe``   frame -> JSON-able dict for the field decoder CLI; ``looks_like_dlt698``
"""

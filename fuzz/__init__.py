"""Volume fuzzing of the parsers that face untrusted bytes (docs/reliability.md).

``.venv/bin/python -m fuzz TARGET --runs N`` with TARGET one of ``dlt645`` (the streaming DL/T 645
Deframer, parse_frame and parse_message), ``dlt698`` (the streaming DL/T 698.45 Deframer with
link-fragment reassembly, parse_apdu of every service the gateway meets, the A-XDR Data decoder,
the catalogue's readings, describe, the exchange and ``meter-gateway decode``: fuzz/dlt698.py),
``cjt188`` (the streaming CJ/T 188 Deframer, parse_message, the meter-type data decoders,
describe, the exchange and ``meter-gateway decode``: fuzz/cjt188.py), ``modbus`` (pymodbus' RTU
and MBAP framers as drivers/modbus.py configures them, the reply checks of ModbusLink and
decode_block) and ``command`` (decode_envelope, peek_command_id and authenticate). Hypothesis
generates structure-aware base inputs; each example is then run with a batch of seeded
byte-level mutations (atheris is not available), so a million executions take minutes, not
hours. Only the documented error types may escape a target; anything else is a crash, reported
by signature with a reproducer. tests/test_fuzz_targets.py runs each target briefly in the suite.
"""

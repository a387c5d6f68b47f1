"""Volume fuzzing of the parsers that face untrusted bytes (not run in CI; docs/reliability.md).

``.venv/bin/python -m fuzz TARGET --runs N`` with TARGET one of ``dlt645`` (the streaming DL/T 645
Deframer, parse_frame and parse_message), ``modbus`` (pymodbus' RTU and MBAP framers as
drivers/modbus.py configures them, the reply checks of ModbusLink and decode_block) and
``command`` (decode_envelope, peek_command_id and authenticate). Hypothesis generates
structure-aware base inputs; each example is then run with a batch of seeded byte-level
mutations (atheris is not available), so a million executions take minutes, not hours. Only the
documented error types may escape a target; anything else is a crash, reported by signature with
a reproducer.
"""

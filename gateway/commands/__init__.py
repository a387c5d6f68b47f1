"""Remote control: signed command envelopes, their authentication, the executor and its guard.

Kept light on purpose: importing the package imports nothing; import the module you need
(``gateway.commands.envelope``, ``gateway.commands.auth``, ...).
"""

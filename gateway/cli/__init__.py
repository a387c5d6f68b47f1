"""The meter-gateway command line: one module per command."""

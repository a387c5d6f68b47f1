"""Southbound acquisition: transports, bus access, protocol drivers and meter models."""

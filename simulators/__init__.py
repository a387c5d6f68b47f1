"""Meter simulators that behave like real meters on a real bus."""

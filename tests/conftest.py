"""Shared fixtures live in tests/plugins/, one module per external system or helper set."""

pytest_plugins = [
    "tests.plugins.vectors",
    "tests.plugins.broker",
    "tests.plugins.ports",
    "tests.plugins.peers",
    "tests.plugins.simulators",
]

"""meter-gateway: meter-data acquisition and remote-control edge gateway.

The repository's top-level folders (``gateway/``, ``protocols/``, ``drivers/``, ``simulators/``)
install as the subpackages of this one import package, so the distribution claims no generic
top-level name.
"""

# The one place the version is written: pyproject.toml reads it from here (tool.setuptools.dynamic).
__version__ = "0.2.0"

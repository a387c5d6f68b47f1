"""The meter-gateway daemon."""

from meter_gateway import __version__

__all__ = ["__version__"]

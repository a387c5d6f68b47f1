"""The driver error family. Third-party errors (pyserial, OSError, pymodbus) are converted to these
at the module that owns that system; nothing above ``drivers/`` sees a foreign exception type."""

from __future__ import annotations


class DriverError(Exception):
    """Base of every error a driver, transport or bus raises."""

    kind = "error"  # short label used in metrics and logs


class LinkDown(DriverError):
    """The transport is not connected (adapter unplugged, TCP link lost or refused)."""

    kind = "link_down"


class NoAnswer(DriverError):
    """No matching reply arrived before the transaction's deadline (after all retries)."""

    kind = "no_answer"


class BadReply(DriverError):
    """Bytes arrived but no valid, matching reply could be formed from them."""

    kind = "bad_reply"


class MeterRefused(DriverError):
    """The meter answered, with an error: a DL/T 645 abnormal reply or a Modbus exception response.

    ``code`` is the raw error byte/word or exception code; ``reasons`` are its decoded names.
    """

    kind = "meter_refused"

    def __init__(self, message: str, *, code: int, reasons: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.reasons = reasons


class ConfigurationError(DriverError):
    """A driver was asked to do something its meter model or settings cannot express."""

    kind = "configuration"

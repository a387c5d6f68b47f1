"""The driver error family. Third-party errors (pyserial, OSError, pymodbus) are converted to these
at the module that owns that system; nothing above ``drivers/`` sees a foreign exception type."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meter_gateway.drivers.reading import Reading


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

    def __init__(self, message: str, *, code: int, reasons: tuple[str, ...] = (), answer: object = None) -> None:
        super().__init__(message)
        self.code = code
        self.reasons = reasons
        self.answer = answer  # the refusing answer as the protocol parsed it, when a caller can use it


class ConfigurationError(DriverError):
    """A driver was asked to do something its meter model or settings cannot express."""

    kind = "configuration"


class PartialRead(DriverError):
    """Some quantities of a read were read and others failed (a noisy bus lost their
    transactions): ``readings`` holds what was read, ``failed`` the quantities that were not,
    ``cause`` the first failure. A caller that can use part of a read (the poller) delivers the
    readings and retries ``failed`` alone; one that cannot treats it as the failure it carries."""

    def __init__(self, readings: list[Reading], failed: tuple[str, ...], cause: DriverError) -> None:
        super().__init__(f"{', '.join(failed)} not read: {cause}")
        self.readings = readings
        self.failed = failed
        self.cause = cause
        self.kind = cause.kind

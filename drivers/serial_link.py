"""Local serial ports (RS-485 adapters) through pyserial-asyncio-fast.

USB adapters vanish: a read error, a write error, or the device path now naming another device (or
nothing) all drop the link, and the supervisor in StreamLink reopens it with jittered, capped
backoff, sleeping in between. pyserial and termios errors are converted to LinkDown here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import termios

import serial
import serial.rs485
import serial_asyncio_fast

from meter_gateway.drivers.errors import LinkDown
from meter_gateway.drivers.log_limit import logfmt_value
from meter_gateway.drivers.transport import Inbox, SerialSettings, StreamLink

log = logging.getLogger(__name__)

_OPEN_ERRORS = (serial.SerialException, OSError, ValueError, termios.error)


class SerialLink(StreamLink):
    def __init__(self, settings: SerialSettings, *, name: str | None = None) -> None:
        super().__init__(
            name or f"serial:{settings.port}",
            reconnect=settings.reconnect,
            no_reply_limit=settings.no_reply_limit,
            write_timeout=settings.write_timeout,
        )
        self.settings = settings
        self._device: int | None = None  # st_rdev of the open device, to notice the path moving on
        self._rs485_refusal_logged = False
        self.rs485_active = False

    def tx_time(self, nbytes: int) -> float:
        return nbytes * self.settings.frame_bits / self.settings.baudrate

    async def _connect(self, inbox: Inbox) -> asyncio.BaseTransport:
        loop = asyncio.get_running_loop()
        # opening can block for a while on some USB adapters: keep it off the event loop
        pending = loop.run_in_executor(None, self._open_port)
        try:
            port, refusal, device = await asyncio.shield(pending)
        except asyncio.CancelledError:
            pending.add_done_callback(_close_orphan)
            raise
        s = self.settings
        if refusal is not None:
            level = logging.DEBUG if self._rs485_refusal_logged else logging.WARNING
            log.log(
                level,
                "event=rs485_mode_refused link=%s error=%s direction=adapter",
                logfmt_value(self.name),
                logfmt_value(refusal),
            )
            self._rs485_refusal_logged = True
        self.rs485_active = s.rs485 is not None and refusal is None
        log.info(
            "event=link_opened link=%s port=%s device=%s settings=%s rs485_kernel=%s",
            logfmt_value(self.name),
            logfmt_value(s.port),
            logfmt_value(device),
            logfmt_value(s.label),
            str(self.rs485_active).lower(),
        )
        try:
            transport, _ = await serial_asyncio_fast.connection_for_serial(loop, lambda: inbox, port)
        except _OPEN_ERRORS as e:
            port.close()
            raise LinkDown(f"cannot start I/O on {s.port}: {e}") from e
        return transport

    def _open_port(self) -> tuple[serial.Serial, str | None, str]:
        """Open and configure the port (runs in an executor thread). Returns the port, the
        reason the kernel refused RS-485 mode (if it did) and the device the path resolves to."""
        s = self.settings
        port = serial.Serial()
        port.port = s.port
        port.baudrate = s.baudrate
        port.bytesize = s.bytesize
        port.parity = s.parity
        port.stopbits = s.stopbits
        port.exclusive = s.exclusive
        port.timeout = 0
        port.write_timeout = 0
        try:
            port.open()
        except termios.error as e:
            # pyserial closes the port again; a pty, for one, refuses parity
            raise LinkDown(f"{s.port} refused line settings {s.label}: {e.args[-1]}") from e
        except _OPEN_ERRORS as e:
            errno = getattr(e, "errno", None)
            raise LinkDown(f"cannot open: {os.strerror(errno) if errno else e}") from e
        refusal = None
        try:
            if s.rs485 is not None:
                try:
                    port.rs485_mode = serial.rs485.RS485Settings(
                        rts_level_for_tx=s.rs485.rts_level_for_tx,
                        rts_level_for_rx=s.rs485.rts_level_for_rx,
                        loopback=s.rs485.rx_during_tx,
                        delay_before_tx=s.rs485.delay_before_tx,
                        delay_before_rx=s.rs485.delay_before_rx,
                    )
                except (ValueError, OSError) as e:
                    refusal = str(e)
                    port.rs485_mode = None
            _check_line_settings(port, s)
            self._device = os.fstat(port.fileno()).st_rdev
        except LinkDown:
            port.close()
            raise
        except _OPEN_ERRORS as e:
            port.close()
            raise LinkDown(f"cannot configure {s.port}: {e}") from e
        return port, refusal, os.path.realpath(s.port)

    def _discard_os_input(self) -> int:
        port = self._port()
        if port is None:
            return 0
        try:
            waiting = int(port.in_waiting)
            port.reset_input_buffer()
        except (serial.SerialException, OSError, termios.error) as e:
            self._drop(f"device error while flushing input: {e}")
            return 0
        return waiting

    def note_silence(self, source: object = None) -> None:
        # a timeout is the cheap moment to ask whether the device file is still ours: an unplugged
        # adapter whose node was removed or reused may otherwise look open but deaf
        if self.connected and not self._device_still_there():
            self._drop(f"device {self.settings.port} is gone or now names another device")
            return
        super().note_silence(source)

    def _device_still_there(self) -> bool:
        try:
            return os.stat(self.settings.port).st_rdev == self._device
        except OSError:
            return False

    def _port(self) -> serial.Serial | None:
        transport = self._transport
        if isinstance(transport, serial_asyncio_fast.SerialTransport):
            return transport.serial
        return None


def _check_line_settings(port: serial.Serial, s: SerialSettings) -> None:
    """Read the line settings back: tcsetattr succeeds if *any* requested change took, so a
    device that silently ignores parity or stop bits would otherwise garble every frame."""
    cflag = termios.tcgetattr(port.fileno())[2]
    sizes = {5: termios.CS5, 6: termios.CS6, 7: termios.CS7, 8: termios.CS8}
    wrong = []
    if bool(cflag & termios.PARENB) != (s.parity != "N") or (
        s.parity != "N" and bool(cflag & termios.PARODD) != (s.parity == "O")
    ):
        wrong.append(f"parity {s.parity}")
    if cflag & termios.CSIZE != sizes[s.bytesize]:
        wrong.append(f"{s.bytesize} data bits")
    if bool(cflag & termios.CSTOPB) != (s.stopbits != 1):
        wrong.append(f"{s.stopbits} stop bits")
    if wrong:
        raise LinkDown(f"{s.port} refused line settings {s.label} (did not take {', '.join(wrong)})")


def _close_orphan(done: asyncio.Future[tuple[serial.Serial, str | None, str]]) -> None:
    """A port opened for a connect attempt that was cancelled meanwhile: close it."""
    if not done.cancelled() and done.exception() is None:
        done.result()[0].close()

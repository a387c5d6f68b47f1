"""TCP links carrying raw bus bytes: transparent serial servers, concentrators, RTU-over-TCP.

Half-open connections are the normal failure here (a concentrator reboots, a cellular NAT forgets
us): keepalive and TCP_USER_TIMEOUT let the kernel notice, and the no-reply policy in StreamLink
notices sooner when the socket looks fine but nothing answers.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket

from meter_gateway.drivers.errors import LinkDown
from meter_gateway.drivers.transport import BufferedInbox, Inbox, StreamLink, TcpSettings

# (option name, level, socket constant name) for what we set and report back
_KEEPALIVE_OPTIONS = (
    ("keepalive", socket.SOL_SOCKET, "SO_KEEPALIVE"),
    ("keepalive_idle", socket.IPPROTO_TCP, "TCP_KEEPIDLE"),
    ("keepalive_interval", socket.IPPROTO_TCP, "TCP_KEEPINTVL"),
    ("keepalive_count", socket.IPPROTO_TCP, "TCP_KEEPCNT"),
    ("user_timeout_ms", socket.IPPROTO_TCP, "TCP_USER_TIMEOUT"),
    ("nodelay", socket.IPPROTO_TCP, "TCP_NODELAY"),
)

_RDHUP = getattr(select, "POLLRDHUP", 0)  # Linux: the peer's FIN, readable without reading


class TcpLink(StreamLink):
    INBOX = BufferedInbox  # receives into a buffer of its own: no large allocation per reply

    def __init__(self, settings: TcpSettings, *, name: str | None = None) -> None:
        super().__init__(
            name or f"tcp://{settings.label}",
            reconnect=settings.reconnect,
            no_reply_limit=settings.no_reply_limit,
            write_timeout=settings.write_timeout,
        )
        self.settings = settings
        self._rdhup: tuple[asyncio.BaseTransport, select.poll] | None = None  # see _peer_closed

    async def _connect(self, inbox: Inbox) -> asyncio.BaseTransport:
        s = self.settings
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(s.connect_timeout):
                transport, _ = await loop.create_connection(lambda: inbox, s.host, s.port)
        except TimeoutError:
            raise LinkDown(f"connect timed out after {s.connect_timeout:.1f} s") from None
        except OSError as e:
            raise LinkDown(os.strerror(e.errno) if e.errno else str(e)) from e
        sock = transport.get_extra_info("socket")
        try:
            self._tune(sock)
        except OSError as e:
            transport.abort()
            raise LinkDown(f"cannot set socket options: {e}") from e
        return transport

    def _tune(self, sock: socket.socket) -> None:
        s = self.settings
        wanted = {
            "keepalive": 1,
            "keepalive_idle": s.keepalive_idle,
            "keepalive_interval": s.keepalive_interval,
            "keepalive_count": s.keepalive_count,
            "user_timeout_ms": int(s.user_timeout * 1000),
            "nodelay": 1,  # frames are small and latency-bound; never wait to coalesce
        }
        for key, level, const in _KEEPALIVE_OPTIONS:
            opt = getattr(socket, const, None)
            if opt is not None:  # not every platform has every option
                sock.setsockopt(level, opt, wanted[key])

    def _peer_closed(self) -> bool:
        # POLLRDHUP: the peer's FIN is in, though the event loop has not read it yet; polling the
        # descriptor reads nothing, so asyncio's own reading is untouched
        transport = self._transport
        if transport is None or not _RDHUP:
            return False
        watch = self._rdhup  # asked before every request: one poll object per connection
        if watch is None or watch[0] is not transport:
            poller = select.poll()
            poller.register(transport.get_extra_info("socket").fileno(), _RDHUP)
            watch = self._rdhup = (transport, poller)
        return bool(watch[1].poll(0))

    def socket_options(self) -> dict[str, int]:
        """The keepalive-related options as the kernel reports them (diagnostics, tests)."""
        transport = self._transport
        if transport is None:
            return {}
        sock = transport.get_extra_info("socket")
        out = {}
        for key, level, const in _KEEPALIVE_OPTIONS:
            opt = getattr(socket, const, None)
            if opt is not None:
                out[key] = int(sock.getsockopt(level, opt))
        return out

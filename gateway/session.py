"""One client connection: its subscriptions, its outbound path and how it ends.

Outbound messages take the shortest path that keeps every bound:

* uncongested client (its outbox empty, its transport below ``write_limit``): the frame goes
  straight to the transport, no queue, no task switch;
* congested client: the message waits in its bounded :class:`~gateway.outbox.Outbox` and the
  slow-consumer policy applies when that fills; when the transport drains (``resume_writing``)
  the queued frames go out coalesced into few writes.

Nothing here ever awaits the client, so one slow or stalled client cannot delay the others.
:meth:`Session.close` never waits either: it writes the close frame and, if the closing
handshake has not finished ``close_timeout`` later, resets the TCP connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from typing import TYPE_CHECKING

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

from gateway.access import Access
from gateway.outbox import Outbox
from gateway.protocol import Close, Outbound
from gateway.settings import SlowConsumerPolicy
from gateway.throttle import Throttle

if TYPE_CHECKING:
    from gateway.stats import Stats

__all__ = ["Session", "SessionConnection"]

log = logging.getLogger("gateway.session")

_LINGER_RESET = struct.pack("ii", 1, 0)
_eviction_log = Throttle()


class SessionConnection(ServerConnection):
    """The websockets connection, told when its transport can take more data."""

    session: Session | None = None
    #: Channels from the ``channels=`` query parameter, validated during the handshake.
    initial_channels: tuple[str, ...] = ()
    #: SO_SNDBUF for client sockets; None leaves the kernel's autotuning.
    send_buffer: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.send_buffer is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.session is not None:
            self.session.flush()


class Session:
    __slots__ = (
        "_abort_handle",
        "_raw",
        "access",
        "channels",
        "close_code",
        "close_reason",
        "close_timeout",
        "connection",
        "dropped",
        "max_bytes",
        "max_messages",
        "outbox",
        "policy",
        "stats",
        "write_limit",
    )

    def __init__(
        self,
        connection: SessionConnection,
        access: Access,
        stats: Stats,
        *,
        max_messages: int,
        max_bytes: int,
        policy: SlowConsumerPolicy,
        close_timeout: float,
    ) -> None:
        self.connection = connection
        self.access = access
        self.stats = stats
        self.channels: set[str] = set()
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.policy = policy
        self.close_timeout = close_timeout
        self.write_limit = connection.write_limit_high
        # Created on first congestion: most clients never need one.
        self.outbox: Outbox | None = None
        self.dropped = 0
        # Without extensions (compression) the shared pre-built frame is exactly what this
        # client must receive; with them, each message is framed by this connection's protocol.
        self._raw = not connection.protocol.extensions
        self.close_code: int | None = None
        self.close_reason = ""
        self._abort_handle: asyncio.TimerHandle | None = None
        connection.session = self

    @property
    def closing(self) -> bool:
        return self.close_code is not None

    @property
    def queued(self) -> int:
        return len(self.outbox) if self.outbox is not None else 0

    def send(self, item: Outbound) -> None:
        """Hand ``item`` to the client or its outbox; never blocks, never raises."""
        if self.close_code is not None:
            return
        connection = self.connection
        outbox = self.outbox
        if not connection.paused and not outbox:
            if connection.protocol.state is State.OPEN:
                self._write((item,))
            return
        if outbox is None:
            outbox = self.outbox = Outbox(self.max_messages, self.max_bytes, self.policy)
        before = outbox.dropped
        if not outbox.push(item):
            self.stats.slow_consumers += 1
            if _eviction_log.ready():
                log.warning(
                    "closing slow consumer %s (1013): queue full at %d messages, %d bytes; "
                    "%d more since the last line",
                    connection.id,
                    len(outbox),
                    outbox.bytes,
                    _eviction_log.take_suppressed(),
                )
            self.close(Close.SLOW_CONSUMER, "slow consumer")
            return
        if outbox.dropped != before:
            self.stats.dropped += outbox.dropped - before

    def flush(self) -> None:
        """Write queued frames while the transport takes them, a few large writes at a time."""
        outbox = self.outbox
        connection = self.connection
        while outbox and not connection.paused and self.close_code is None:
            if connection.protocol.state is not State.OPEN:
                outbox.clear()
                return
            self._write(outbox.pop_batch(self.write_limit))

    def _write(self, items: tuple[Outbound, ...] | list[Outbound]) -> None:
        connection = self.connection
        try:
            if self._raw:
                if len(items) == 1:
                    connection.transport.write(items[0].frame)
                else:
                    connection.transport.write(b"".join([item.frame for item in items]))
            else:
                for item in items:
                    connection.protocol.send_text(item.text)
                connection.send_data()
        except Exception as exc:  # the transport is closing; the reader will see it
            log.debug("write to %s failed: %s", connection.id, exc)

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake without waiting; reset the connection if it stalls."""
        if self.close_code is not None:
            return
        self.close_code = code
        self.close_reason = reason
        if self.outbox is not None:
            self.dropped += len(self.outbox)
            self.outbox.clear()  # the client will never read these; free them now
        connection = self.connection
        if connection.protocol.state is State.OPEN:
            try:
                connection.protocol.send_close(code, reason)
                connection.send_data()
            except Exception as exc:
                log.debug("close of %s failed: %s", connection.id, exc)
        loop = asyncio.get_running_loop()
        self._abort_handle = loop.call_later(self.close_timeout, self.abort)

    def abort(self) -> None:
        """Reset the TCP connection now, freeing the kernel's buffers for it at once."""
        transport = self.connection.transport
        if transport.is_closing() and self.connection.protocol.state is State.CLOSED:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        transport.abort()

    def finish(self) -> None:
        """Forget everything once the connection is closed."""
        if self._abort_handle is not None:
            self._abort_handle.cancel()
            self._abort_handle = None
        if self.outbox is not None:
            self.outbox.clear()
        self.connection.session = None

"""One client connection: its subscriptions, its outbound path and how it ends.

Outbound messages take the shortest path that keeps every bound:

* uncongested client (its outbox empty, its transport below ``write_limit``): the frame goes
  straight to the transport, no queue, no task switch;
* congested client: the message waits in its bounded :class:`~gateway.outbox.Outbox` and the
  slow-consumer policy applies when that fills; when the transport drains (``resume_writing``)
  the queued frames go out coalesced into few writes;
* resuming client: its replay waits in the outbox too, a page at a time going to the
  transport as it drains, and what arrives meanwhile waits behind it.

While a client is congested the gateway also stops reading from it, so a client that does not
read cannot make the gateway write (pongs to its pings, replies to its requests) without bound.
Every frame a client sends (data, continuation, ping, pong) counts against its rate limit;
beyond it the client is closed with 1008 and nothing more it sent is read.

Before any of that, the replica's :class:`~gateway.admission.Admission` decides which sockets
it takes at all: a socket with no descriptor to spare is answered 503 and closed before a byte
of it is read; a handshake that sends more than the header budget gets 431.

Nothing here ever awaits the client, so one slow or stalled client cannot delay the others.
:meth:`Session.close` never waits either: it writes the close frame and, if the closing
handshake has not finished ``close_timeout`` later, resets the TCP connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from websockets.asyncio.connection import Connection
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import InvalidMessage
from websockets.frames import DATA_OPCODES, TEXT, CloseCode, Frame
from websockets.http11 import Request, Response
from websockets.protocol import CONNECTING, OPEN, State

from gateway.access import Access
from gateway.admission import Admission
from gateway.outbox import Outbox
from gateway.protocol import Close, Outbound
from gateway.ratelimit import TokenBucket
from gateway.settings import SlowConsumerPolicy
from gateway.throttle import Throttle

if TYPE_CHECKING:
    from gateway.auth import Identity
    from gateway.stats import Stats

__all__ = ["INBOX", "Limits", "Session", "SessionConnection", "Unacceptable"]

log = logging.getLogger("gateway.session")

#: Requests received from a client and not yet served, beyond which its socket is not read:
#: with max_size, what a client can make the replica hold of what it sent.
INBOX = 4
#: Frames one fragmented message may have (the library's own bound).
MAX_FRAGMENTS = 4096

_LINGER_RESET = struct.pack("ii", 1, 0)
#: Inbound data is handed to the protocol this much at a time, so a flood of tiny frames in
#: one read costs at most this much parsing (and as many pongs) after its sender is closed.
_FEED = 4096
#: Bytes one flush writes before the loop's other callbacks get their turn.
_FLUSH_BYTES = 256 * 1024
#: Seconds between closing a flooding client and resetting its connection.
_FLOOD_GRACE = 1.0
_PING = struct.Struct("!d")  # a keepalive ping carries the loop time it was sent at
_eviction_log = Throttle()


@dataclass(frozen=True, slots=True)
class Unacceptable:
    """A message the connection is to be failed for (the library's close code and reason),
    in its place among the requests: those sent before it are served first."""

    code: CloseCode
    reason: str


@dataclass(frozen=True, slots=True)
class Limits:
    """What every session of a replica shares (one object, not one copy per connection)."""

    max_messages: int
    max_bytes: int
    policy: SlowConsumerPolicy
    close_timeout: float
    rate: float  # inbound messages a second, burst the same
    max_subscriptions: int
    ping_interval: float
    ping_timeout: float


def _nothing() -> None:
    pass


def _drop_tracebacks(failure: BaseException | None) -> None:
    """Forget the frames an exception (and those it chains, a few deep) holds: they refer
    back to the protocol that holds the exception."""
    for _ in range(8):
        if failure is None:
            return
        failure.__traceback__ = None
        failure = failure.__cause__ or failure.__context__


def _plain_response(status: str, text: str) -> bytes:
    """A whole HTTP response, built once: what refused sockets get instead of a handshake."""
    body = text.encode()
    return (
        f"HTTP/1.1 {status}\r\nServer: wsgateway\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


_AT_CAPACITY = _plain_response("503 Service Unavailable", "at capacity\n")
_HEADERS_TOO_LARGE = _plain_response(
    "431 Request Header Fields Too Large", "request headers too large\n"
)
_NOT_HTTP = _plain_response("400 Bad Request", "not a valid HTTP request\n")
#: Every connection's logger: the library gives each its own adapter (about 0.4 KiB), only
#: to name the connection in its debug lines.
_LIBRARY_LOG = logging.getLogger("websockets.server")


class _NoFrames:
    """Stands in for the library's queue of inbound frames (an object and a deque, about
    0.9 KiB a client) once the session takes each message as it arrives: shared, holds
    nothing."""

    paused = False

    def close(self) -> None:
        pass

    def put(self, frame: Frame) -> None:
        raise AssertionError("frames go to the session")


_NO_FRAMES: Any = _NoFrames()
#: What the library keeps as the handshake request once the session has started: it tells
#: the handshake from later frames by one being set, and nothing else reads it.
_OPENED = Request("/", cast(Any, None))


class SessionConnection(ServerConnection):
    """The websockets connection: it runs the opening handshake in a task that ends with it,
    then hands its session each message as it arrives, and tells it when the transport fills
    and drains. No task waits on an idle connection."""

    session: Session | None = None
    #: SO_SNDBUF for client sockets; None leaves the kernel's autotuning.
    send_buffer: int | None = None
    #: Called with the session when its transport fills up (the replica's stall watch).
    on_congested: Callable[[Session], None] | None = None
    #: Called with the round-trip time of each keepalive pong.
    on_latency: Callable[[float], object] | None = None
    #: The replica's sockets and handshakes (None: no bounds, for tests of the rest).
    admission: Admission[SessionConnection] | None = None
    #: Called with the reason when a socket is refused or cut before its handshake ends.
    on_refused: Callable[[str], object] | None = None
    #: True only on a socket refused at once (set on the instance, so others carry nothing).
    refused = False
    #: True once a request that is not valid HTTP was answered 400 (set on the instance).
    answered_not_http = False
    #: The replica's side of the opening handshake: what the library's serve() would pass.
    check_request: Callable[[ServerConnection, Request], Response | None] | None = None
    check_response: Callable[[ServerConnection, Request, Response], Response | None] | None = None
    open_timeout: float = 10.0
    #: The replica starts the session of a connection whose handshake succeeded.
    open_session: Callable[[SessionConnection], Awaitable[None]] | None = None
    #: Each whole message the client sends (text decoded), handed to the replica.
    on_message: Callable[[Session, str | bytes | Unacceptable], None] | None = None
    #: Called once the connection of a session is closed.
    on_closed: Callable[[Session], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.protocol.logger = self.logger = _LIBRARY_LOG

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        admission = self.admission
        if admission is not None:
            admitted, evicted = admission.arrive(self)
            if not admitted:
                # Nothing of this socket is read and no task is started for it.
                self.refused = True
                self._reject(cast(asyncio.Transport, transport), _AT_CAPACITY, "descriptors")
                return
            if evicted is not None:
                evicted.abort()
                if self.on_refused is not None:
                    self.on_refused("handshakes")
        # Not ServerConnection's, which starts a task that lives as long as the connection
        # (with the request loop's coroutines, about 1.6 KiB a client): this task ends with
        # the handshake, and the session then takes messages as they arrive.
        Connection.connection_made(self, transport)
        task = self.loop.create_task(self._open())
        self.server.handler_tasks.add(task)
        if self.send_buffer is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer)
        # Reading resumes only when neither the inbound queue nor congestion holds it.
        self.recv_messages.resume = self._resume_reading
        # The library only appends to, iterates and removes from its drain waiters, which a
        # list does too, in 56 bytes instead of an empty deque's 600 (for every client).
        self.drain_waiters = cast("collections.deque[asyncio.Future[None]]", [])

    async def _open(self) -> None:
        """The opening handshake, then the session's start (what the library's serve() does,
        without then waiting in a handler for as long as the connection lasts)."""
        try:
            async with asyncio.timeout(self.open_timeout):
                await self.handshake(self.check_request, self.check_response, "wsgateway")
            if self.protocol.state is not OPEN:
                self.transport.abort()
                return
            assert self.open_session is not None
            await self.open_session(self)
        except Exception:
            self.transport.abort()
        finally:
            self.server.handler_tasks.discard(cast("asyncio.Task[None]", asyncio.current_task()))

    def take_messages(self, session: Session) -> None:
        """From now on hand ``session`` each message as it arrives; the frames that came
        during the handshake first. Then forget what only the handshake needed."""
        session.reading = True
        frames = self.recv_messages
        if frames is not _NO_FRAMES:
            self.recv_messages = _NO_FRAMES
            for frame in frames.frames.queue:
                self._message_part(session, frame)
        for message in (self.request, self.response):
            if message is not None:
                message.headers.clear()
        self.request, self.response = _OPENED, None
        self.request_rcvd = cast("asyncio.Future[None]", None)

    def _message_part(self, session: Session, frame: Frame) -> None:
        """Assemble the client's messages from data frames (fragments are rare: clients
        send each message as one frame)."""
        parts = session.fragments
        if parts is None:
            if frame.fin:
                self._message(session, frame.opcode is TEXT, frame.data)
                return
            session.fragments = (frame.opcode is TEXT, [bytes(frame.data)])
            return
        text, data = parts
        data.append(bytes(frame.data))
        if len(data) > MAX_FRAGMENTS:
            session.fragments = None
            assert self.on_message is not None
            self.on_message(session, Unacceptable(CloseCode.MESSAGE_TOO_BIG, "too many fragments"))
        elif frame.fin:
            session.fragments = None
            self._message(session, text, b"".join(data))

    def _message(self, session: Session, text: bool, data: bytes | bytearray | memoryview) -> None:
        message: str | bytes | Unacceptable
        if text:
            try:
                message = bytes(data).decode()
            except UnicodeDecodeError as exc:
                message = Unacceptable(
                    CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}"
                )
        else:
            message = bytes(data)
        assert self.on_message is not None
        self.on_message(session, message)

    def fail(self, code: CloseCode, reason: str) -> None:
        """Close as the library does when a message is not acceptable (counted as its)."""
        if self.protocol.state is not OPEN:
            return
        self.protocol.fail(code, reason)
        self.send_data()
        if self.close_deadline is None and self.close_timeout is not None:
            self.close_deadline = self.loop.time() + self.close_timeout

    def _reject(self, transport: asyncio.Transport, response: bytes, reason: str) -> None:
        transport.write(response)
        transport.close()
        if self.on_refused is not None:
            self.on_refused(reason)

    def abort(self) -> None:
        """Reset the TCP connection now, freeing the kernel's buffers for it at once."""
        transport = self.transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.protocol.state is CONNECTING and self.admission is not None:
            request = self.admission.received(self, data)
            if request is None:
                self.transport.pause_reading()
                self._reject(self.transport, _HEADERS_TOO_LARGE, "headers")
                return
            data = request
            if not data:
                return  # the head of the request is not complete yet
        if len(data) <= _FEED:
            super().data_received(data)
            return
        view = memoryview(data)
        for start in range(0, len(data), _FEED):
            if self.deaf:
                return
            super().data_received(view[start : start + _FEED])  # type: ignore[arg-type]

    @property
    def deaf(self) -> bool:
        """Its session was closed for flooding: nothing more it sends is read."""
        session = self.session
        return session is not None and session.deaf

    def process_event(self, event: object) -> None:
        session = self.session
        if session is not None and isinstance(event, Frame):
            session.count_frame()  # while closing too: a flood then is no answer to our close
            if event.opcode in DATA_OPCODES and session.reading:
                self._message_part(session, event)
                return
        super().process_event(event)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:
            return  # never started: nothing to undo
        if self.admission is not None:
            self.admission.left(self)
        session = self.session
        if session is not None:
            session.direct = None
        super().connection_lost(exc)
        # Break the reference cycles a connection is left in, so that it is freed as soon as
        # the last reference goes rather than by a full garbage collection: under connection
        # churn those take 100 ms and more, every client waiting.
        if self.recv_messages is not _NO_FRAMES:
            self.recv_messages.resume = _nothing
        for failure in (self.protocol.handshake_exc, self.protocol.parser_exc):
            _drop_tracebacks(failure)
        if session is not None and self.on_closed is not None:
            self.on_closed(session)

    def acknowledge_pings(self, data: bytes) -> None:
        session = self.session
        if session is None or session.ping_sent is None or data != _PING.pack(session.ping_sent):
            super().acknowledge_pings(data)  # not our keepalive's
            return
        self.latency = self.loop.time() - session.ping_sent
        session.ping_sent = None
        if self.on_latency is not None:
            self.on_latency(self.latency)

    def _resume_reading(self) -> None:
        if not self.paused and not self.recv_messages.paused and not self.deaf:
            session = self.session
            if session is None or len(session.inbox or ()) < INBOX:
                self.transport.resume_reading()

    def send_data(self) -> None:
        protocol = self.protocol
        if (
            protocol.state is CONNECTING
            and isinstance(protocol.handshake_exc, InvalidMessage)
            and not self.answered_not_http
        ):
            # websockets hangs up on a request it cannot parse (a NUL in a header, a broken
            # request line) without a word, and its half-close did not always reach the peer
            # before the open timeout: answer it and close.
            self.answered_not_http = True
            self.protocol.data_to_send()  # the end of stream queued: closing says it
            self._reject(self.transport, _NOT_HTTP, "malformed")
            return
        # Every change of the protocol's state is followed by a call to send_data: once the
        # connection is no longer OPEN, data frames may no longer be written straight through.
        super().send_data()
        session = self.session
        if session is not None and session.direct is not None and self.protocol.state is not OPEN:
            session.direct = None

    def pause_writing(self) -> None:
        super().pause_writing()
        self.transport.pause_reading()
        session = self.session
        if session is not None:
            session.direct = None
            if self.on_congested is not None:
                self.on_congested(session)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._resume_reading()
        if self.session is not None:
            self.session.flush()


class Session:
    __slots__ = (
        "_abort_handle",
        "_expiry_handle",
        "_more",
        "_raw",
        "access",
        "bucket",
        "channels",
        "close_cause",
        "close_code",
        "close_reason",
        "congested_at",
        "connection",
        "deaf",
        "direct",
        "fragments",
        "inbox",
        "info",
        "limits",
        "outbox",
        "ping_due",
        "ping_sent",
        "presence_reads",
        "reading",
        "refreshed_at",
        "refusals",
        "stats",
        "subject",
        "worker",
    )

    def __init__(
        self, connection: SessionConnection, identity: Identity, stats: Stats, limits: Limits
    ) -> None:
        self.connection = connection
        self.subject = identity.subject
        self.info = identity.info  # shown in presence entries
        self.access: Access = identity.access
        self.stats = stats
        self.limits = limits
        self.channels: set[str] = set()
        loop = asyncio.get_running_loop()
        self.bucket = TokenBucket(limits.rate, limits.rate, loop.time())
        # Created on first congestion: most clients never need one.
        self.outbox: Outbox | None = None
        # Without extensions (compression) the shared pre-built frame is exactly what this
        # client must receive; with them, each message is framed by this connection's protocol.
        self._raw = not connection.protocol.extensions
        self.close_code: int | None = None
        self.close_reason = ""
        #: Why the replica closed it, for the close metric when the code does not say
        #: (a service's disconnect can use any code); None: the code says.
        self.close_cause: str | None = None
        self.congested_at: float | None = None  # loop time the transport last filled up
        self.deaf = False  # closed for flooding: its socket is no longer read
        #: The transport's write while frames may go straight to it (uncompressed, OPEN, not
        #: congested, nothing queued, not closing), else None: the hub's fan-out loop calls it
        #: directly, the cheapest delivery there is.
        self.direct: Callable[[bytes], object] | None = None
        self._update_direct()
        # Keepalive, driven by the replica's sweep (one task for all connections, not one each).
        self.ping_due = loop.time() + limits.ping_interval
        self.ping_sent: float | None = None  # loop time of the ping awaiting its pong
        self._abort_handle: asyncio.TimerHandle | None = None
        self._expiry_handle: asyncio.TimerHandle | None = None
        self._more: asyncio.Handle | None = None  # the rest of a flush, on the next turn
        self._expire_at(identity.expires_at)
        #: Whether its connection hands it messages as they arrive (see take_messages).
        self.reading = False
        #: Requests received and not yet served, oldest first (None while there are none),
        #: and the task serving them, which exists only while there are.
        self.inbox: collections.deque[str | bytes | Unacceptable] | None = None
        self.worker: asyncio.Task[None] | None = None
        #: A fragmented message being received: whether it is text, and its parts so far.
        self.fragments: tuple[bool, list[bytes]] | None = None
        #: Loop time of its last refresh, and how many in a row were refused.
        self.refreshed_at = -math.inf
        self.refusals = 0
        #: Its presence reads' token bucket, made with its first presence read.
        self.presence_reads: TokenBucket | None = None
        connection.session = self

    def received(self, message: str | bytes | Unacceptable) -> bool:
        """Queue a request; return whether it is the first waiting (nobody serves them yet).

        Beyond :data:`INBOX` waiting, the socket is not read until they are served.
        """
        inbox = self.inbox
        if inbox is None:
            inbox = self.inbox = collections.deque()
        inbox.append(message)
        if len(inbox) >= INBOX:
            self.connection.transport.pause_reading()
        return self.worker is None

    def next_request(self) -> str | bytes | Unacceptable | None:
        """The oldest request waiting, or None (and the inbox is gone) when there is none."""
        inbox = self.inbox
        if not inbox:
            self.inbox = None
            return None
        message = inbox.popleft()
        if len(inbox) == INBOX - 1:
            self.connection._resume_reading()
        return message

    def _expire_at(self, expires_at: float | None) -> None:
        """Close with 4001 at ``expires_at`` (the token's exp, unix time), if any."""
        if self._expiry_handle is not None:
            self._expiry_handle.cancel()
            self._expiry_handle = None
        if expires_at is not None:
            self._expiry_handle = asyncio.get_running_loop().call_later(
                max(0.0, expires_at - time.time()), self.close, Close.TOKEN_EXPIRED, "token expired"
            )

    def renew(self, identity: Identity) -> None:
        """A refreshed token: its rights and its expiry from now on (the caller checked that
        it is the same subject)."""
        self.access = identity.access.keeping_placed(self.access)
        self._expire_at(identity.expires_at)

    @property
    def closing(self) -> bool:
        return self.close_code is not None

    @property
    def queued(self) -> int:
        return len(self.outbox) if self.outbox is not None else 0

    def _update_direct(self) -> None:
        connection = self.connection
        ok = self._raw and not connection.paused and not self.outbox and self.close_code is None
        self.direct = (
            connection.transport.write if ok and connection.protocol.state is OPEN else None
        )

    def send(self, item: Outbound) -> None:
        """Hand ``item`` to the client or its outbox; never blocks, never raises."""
        self.deliver((item,), item.frame)

    def deliver(self, items: Sequence[Outbound], frame: bytes) -> None:
        """Hand ``items`` to the client in one write, or to its outbox when congested.

        ``frame`` is the items' frames joined, built once by the caller for every recipient.
        """
        if self.close_code is not None:
            return
        connection = self.connection
        outbox = self.outbox
        if not connection.paused and not outbox:
            if connection.protocol.state is State.OPEN:
                self._write(items, frame)
            return
        if outbox is None:
            outbox = self._new_outbox()
        for item in items:
            before = outbox.dropped
            self.stats.record_queue_depth(len(outbox))
            if not outbox.push(item):
                self._evict_slow_consumer(outbox)
                return
            if outbox.dropped != before:
                self.stats.drops[(outbox.policy, "queue_full")] += outbox.dropped - before

    def _new_outbox(self) -> Outbox:
        limits = self.limits
        self.outbox = Outbox(limits.max_messages, limits.max_bytes, limits.policy)
        return self.outbox

    def replay(self, items: Sequence[Outbound]) -> None:
        """Hand a resuming client the messages it missed, after whatever it has queued.

        ``items`` is shared by every client of a reconnect storm: it is written page by page
        as this client's transport drains, never copied whole, and a client that stops
        reading meanwhile is cut off like any other (stall timeout, slow-consumer policy on
        what arrives behind the replay).
        """
        if self.close_code is not None or not items:
            return
        outbox = self.outbox if self.outbox is not None else self._new_outbox()
        outbox.push_replay(items)
        self.direct = None
        self.flush()

    def _evict_slow_consumer(self, outbox: Outbox) -> None:
        self.stats.slow_consumers += 1
        if _eviction_log.ready():
            log.warning(
                "closing slow consumer %s (1013): queue full at %d messages, %d bytes; "
                "%d more since the last line",
                self.connection.id,
                len(outbox),
                outbox.bytes,
                _eviction_log.take_suppressed(),
            )
        self.close(Close.SLOW_CONSUMER, "slow consumer")

    def flush(self) -> None:
        """Write queued frames while the transport takes them, a few large writes at a time.

        At most ``_FLUSH_BYTES`` a call: a client whose kernel buffer takes megabytes (a
        replay to a fast reader) gets the rest on the loop's next turn, after the others.
        """
        if self._more is not None:
            self._more.cancel()
            self._more = None
        outbox = self.outbox
        connection = self.connection
        budget = _FLUSH_BYTES
        while outbox and not connection.paused and self.close_code is None:
            if connection.protocol.state is not State.OPEN:
                outbox.clear()
                return
            if budget <= 0:
                self._more = connection.loop.call_soon(self.flush)
                break
            replayed = outbox.replaying
            batch = outbox.pop_batch(connection.write_limit_high)
            if self._raw:
                frame = b"".join([item.frame for item in batch])
                budget -= len(frame)
            else:
                frame = b""
                budget -= sum(len(item) for item in batch)
            self._write(batch, frame)
            if replayed:
                continue  # old messages: their age is not a delivery latency
            now_ms = time.time() * 1000
            for item in batch:
                if item.ts is not None:
                    self.stats.record_latency(max(0.0, now_ms - item.ts) / 1000)
        self._update_direct()

    def _write(self, items: Sequence[Outbound], frame: bytes) -> None:
        connection = self.connection
        self.stats.writes += 1
        try:
            if self._raw:
                connection.transport.write(frame)
            else:
                for item in items:
                    connection.protocol.send_text(item.text)
                connection.send_data()
        except Exception as exc:  # the transport is closing; the reader will see it
            log.debug("write to %s failed: %s", connection.id, exc)

    def keepalive(self, now: float) -> None:
        """Ping when due; close 1011 when the last ping's pong is ``ping_timeout`` late; reset
        a connection whose closing handshake the client has not finished in time."""
        deadline = self.connection.close_deadline
        if deadline is not None and now >= deadline and self._abort_handle is None:
            self.abort()  # the library closed it (1007, 1009...), or the client: no answer
            return
        sent = self.ping_sent
        if sent is not None:
            if now - sent >= self.limits.ping_timeout and self.close_code is None:
                self.close(Close.INTERNAL_ERROR, "keepalive ping timeout", cause="keepalive")
            return
        if now < self.ping_due or self.close_code is not None:
            return
        self.ping_sent = now
        self.ping_due = now + self.limits.ping_interval
        connection = self.connection
        if connection.protocol.state is OPEN:
            try:
                connection.protocol.send_ping(_PING.pack(now))
                connection.send_data()
            except Exception as exc:  # the transport is closing; the reader will see it
                log.debug("ping to %s failed: %s", connection.id, exc)

    def count_frame(self) -> None:
        """Count one inbound frame (of any kind) against the rate limit. Beyond it: close
        1008, and stop reading, so the rest of a flood costs nothing."""
        if self.bucket.take(self.connection.loop.time()) or self.deaf:
            return
        self.deaf = True
        self.connection.transport.pause_reading()
        # Its answer to the close frame cannot be read any more: a second for the frame to
        # reach it, then the reset.
        grace = min(_FLOOD_GRACE, self.limits.close_timeout)
        if self.close_code is None:
            self.close(Close.POLICY_VIOLATION, "rate limit exceeded", abort_after=grace)
            return
        # Closed already (evicted, say) and flooding instead of answering: no longer read
        # until the close timeout, reset after the same grace.
        if self._abort_handle is not None:
            self._abort_handle.cancel()
        self._abort_handle = self.connection.loop.call_later(grace, self.abort)

    def close(
        self,
        code: int,
        reason: str = "",
        *,
        abort_after: float | None = None,
        cause: str | None = None,
    ) -> None:
        """Start the closing handshake without waiting; reset the connection if it stalls.

        ``abort_after`` defaults to ``close_timeout``; 0 resets the connection at once (for a
        client whose buffers are full, the close frame could never reach it anyway).
        """
        if self.close_code is not None:
            return
        self.direct = None
        self.close_code = code
        self.close_reason = reason
        self.close_cause = cause
        if self.outbox:
            # The client will never read these: free them now.
            self.stats.drops[(self.limits.policy, "closed")] += self.outbox.clear()
        connection = self.connection
        if connection.protocol.state is State.OPEN:
            try:
                connection.protocol.send_close(code, reason)
                connection.send_data()
            except Exception as exc:
                log.debug("close of %s failed: %s", connection.id, exc)
        if abort_after is None:
            abort_after = self.limits.close_timeout
        if abort_after <= 0:
            self.abort()
        else:
            self._abort_handle = connection.loop.call_later(abort_after, self.abort)

    def abort(self) -> None:
        """Reset the TCP connection now, freeing the kernel's buffers for it at once."""
        self.direct = None
        if self.connection.protocol.state is not State.CLOSED:
            self.connection.abort()

    def finish(self) -> None:
        """Forget everything once the connection is closed."""
        for handle in (self._abort_handle, self._expiry_handle, self._more):
            if handle is not None:
                handle.cancel()
        self._abort_handle = self._expiry_handle = self._more = None
        self.direct = None
        self.inbox = self.fragments = None
        if self.outbox is not None:
            self.outbox.clear()
        self.connection.session = None

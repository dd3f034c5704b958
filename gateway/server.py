"""The replica: the WebSocket endpoint, the HTTP probes, each client's request loop, shutdown.

``/ws`` speaks client protocol v1; ``/healthz`` and ``/readyz`` answer plain HTTP on the same
port; every other path is a 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http
import logging
from urllib.parse import parse_qs, urlsplit

import msgspec
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from gateway.access import Access
from gateway.backplane import BackplaneUnavailable, create_backplane
from gateway.hub import Hub
from gateway.protocol import (
    Close,
    ErrorCode,
    Ping,
    Publish,
    RequestError,
    Subscribe,
    Unsubscribe,
    error,
    parse_channel_list,
    parse_request,
    reply,
)
from gateway.session import Session, SessionConnection
from gateway.settings import Settings
from gateway.stats import Stats
from publisher.envelope import EnvelopeError, build_envelope

__all__ = ["Gateway"]

log = logging.getLogger("gateway")

WS_PATH = "/ws"


class Gateway:
    """One replica. ``await start()``, later ``await shutdown()``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stats = Stats()
        self.hub = Hub(functools.partial(create_backplane, settings), self.stats)
        self.anonymous = Access(
            subscribe=settings.patterns(settings.anonymous_channels),
            publish=settings.patterns(settings.anonymous_publish),
        )
        self.sessions: set[Session] = set()
        self.draining = False
        self.server: Server | None = None
        self._all_closed = asyncio.Event()

    @property
    def backplane_name(self) -> str:
        return self.hub.backplane.name

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if not self.hub.backplane.connected:
            return False, f"{self.backplane_name} backplane disconnected"
        return True, "ready"

    async def start(self) -> None:
        s = self.settings
        await self.hub.backplane.start()
        # A subclass per replica carries its socket options, so replicas in one process
        # (tests) do not share them.
        connection_class = type(
            "SessionConnection", (SessionConnection,), {"send_buffer": s.send_buffer}
        )
        self.server = await serve(
            self._handle,
            s.host,
            s.port,
            create_connection=connection_class,
            process_request=self._process_request,
            compression="deflate" if s.compression == "deflate" else None,
            max_size=s.max_message_size,
            ping_interval=s.ping_interval,
            ping_timeout=s.ping_timeout,
            close_timeout=s.close_timeout,
            open_timeout=s.open_timeout,
            write_limit=s.write_limit,
            server_header="wsgateway",
        )

    # Handshake and plain HTTP

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "ok\n")
        if url.path == "/readyz":
            ready, reason = self.readiness()
            status = http.HTTPStatus.OK if ready else http.HTTPStatus.SERVICE_UNAVAILABLE
            return connection.respond(status, reason + "\n")
        if url.path != WS_PATH:
            return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        if self.draining:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
        query = parse_qs(url.query, keep_blank_values=True)
        channels: list[str] = []
        for value in query.get("channels", ()):
            if not value:
                continue
            try:
                channels.extend(c for c in parse_channel_list(value) if c not in channels)
            except ValueError as exc:
                return connection.respond(http.HTTPStatus.BAD_REQUEST, f"channels: {exc}\n")
        assert isinstance(connection, SessionConnection)
        connection.initial_channels = tuple(channels)
        return None

    # One client

    async def _handle(self, connection: ServerConnection) -> None:
        assert isinstance(connection, SessionConnection)
        s = self.settings
        session = Session(
            connection,
            self.anonymous,
            self.stats,
            max_messages=s.queue_max_messages,
            max_bytes=s.queue_max_bytes,
            policy=s.slow_consumer_policy,
            close_timeout=s.close_timeout,
        )
        self.sessions.add(session)
        self.stats.connections_opened += 1
        self.stats.connections_open += 1
        try:
            for channel in connection.initial_channels:
                await self._subscribe(session, channel, None)
            async for text in connection:
                if session.closing:
                    continue  # keep reading so the closing handshake can finish
                if isinstance(text, bytes):
                    session.close(Close.BINARY_NOT_ACCEPTED, "binary frames are not accepted")
                    continue
                await self._serve_request(session, text)
        except ConnectionClosed:
            pass
        finally:
            await self.hub.leave(session)
            self.sessions.discard(session)
            if not self.sessions:
                self._all_closed.set()
            self.stats.connections_open -= 1
            self._count_close(session)
            session.finish()

    def _count_close(self, session: Session) -> None:
        connection = session.connection
        if session.close_code is not None:
            code, reason = session.close_code, _close_reason(session.close_code)
        else:
            # Closed by the client, by the library (1009 too big, 1011 keepalive timeout) or
            # by the network (1006).
            code = connection.close_code if connection.close_code is not None else 1006
            reason = "client" if code in (1000, 1001) else "error"
            if code == Close.MESSAGE_TOO_BIG:
                reason = "limit"
        self.stats.closes[(code, reason)] += 1
        dropped = session.outbox.dropped if session.outbox is not None else 0
        log.debug(
            "connection %s closed: %d (%s), %d messages dropped by policy %s",
            connection.id,
            code,
            reason,
            dropped,
            session.policy,
        )

    async def _serve_request(self, session: Session, text: str) -> None:
        try:
            request = parse_request(text)
            if isinstance(request, Subscribe):
                await self._subscribe(session, request.channel, request.id)
            elif isinstance(request, Unsubscribe):
                await self.hub.unsubscribe(session, request.channel)
                session.send(reply("unsubscribed", request.id, request.channel))
            elif isinstance(request, Publish):
                await self._publish(session, request)
            elif isinstance(request, Ping):
                session.send(reply("pong", request.id))
        except RequestError as exc:
            session.send(error(exc))

    async def _subscribe(self, session: Session, channel: str, request_id: int | None) -> None:
        if not session.access.can_subscribe(channel):
            _send_error(
                session, ErrorCode.FORBIDDEN, f"not allowed to subscribe to {channel!r}", request_id
            )
            return
        if (
            channel not in session.channels
            and len(session.channels) >= self.settings.max_subscriptions
        ):
            _send_error(
                session,
                ErrorCode.LIMIT,
                f"at most {self.settings.max_subscriptions} subscriptions per connection",
                request_id,
            )
            return
        try:
            await self.hub.subscribe(session, channel)
        except BackplaneUnavailable as exc:
            _send_error(session, ErrorCode.UNAVAILABLE, str(exc), request_id)
            return
        session.send(reply("subscribed", request_id, channel))

    async def _publish(self, session: Session, request: Publish) -> None:
        if not session.access.can_publish(request.channel):
            raise RequestError(
                ErrorCode.FORBIDDEN, f"not allowed to publish to {request.channel!r}", request.id
            )
        try:
            envelope = build_envelope(request.channel, msgspec.json.decode(request.data))
        except EnvelopeError as exc:
            raise RequestError(ErrorCode.BAD_REQUEST, str(exc), request.id) from None
        try:
            await self.hub.backplane.publish(request.channel, envelope)
        except BackplaneUnavailable as exc:
            raise RequestError(ErrorCode.UNAVAILABLE, str(exc), request.id) from None
        session.send(reply("published", request.id))

    # Shutdown

    async def shutdown(self) -> None:
        """Fail readiness, answer new handshakes 503, close every client with 1001, stop."""
        self.draining = True
        log.info("draining %d connections", len(self.sessions))
        self._all_closed.clear()
        for session in list(self.sessions):
            session.close(Close.GOING_AWAY, "server shutting down")
        if self.sessions:
            # Session.close resets a connection whose handshake outlives close_timeout.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.close_timeout + 1):
                    await self._all_closed.wait()
        if self.server is not None:
            self.server.close(close_connections=False)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    await self.server.wait_closed()
        await self.hub.backplane.close()
        log.info("stopped")


def _send_error(session: Session, code: ErrorCode, message: str, request_id: int | None) -> None:
    session.send(error(RequestError(code, message, request_id)))


_CLOSE_REASONS: dict[int, str] = {
    Close.SLOW_CONSUMER: "slow_consumer",
    Close.GOING_AWAY: "drain",
    Close.POLICY_VIOLATION: "rate_limit",
    Close.TOKEN_EXPIRED: "auth",
    Close.BINARY_NOT_ACCEPTED: "protocol",
}


def _close_reason(code: int) -> str:
    """The low-cardinality reason of a close the gateway decided on."""
    return _CLOSE_REASONS.get(code, "error")

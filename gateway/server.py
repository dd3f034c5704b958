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
import os
import random
import re
import resource
import socket
import threading
import uuid
import weakref
from urllib.parse import parse_qs, urlsplit

import msgspec
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import SpanKind, StatusCode, TracerProvider
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.protocol import OPEN
from websockets.typing import Origin

from gateway import demo, lag
from gateway.access import Access
from gateway.admission import Admission
from gateway.auth import Authenticator, AuthError, Identity, bearer_token
from gateway.backlog import Backlog
from gateway.backplane import BackplaneUnavailable, create_backplane
from gateway.coalescing import Coalescing, Mode
from gateway.control import Control
from gateway.history import ReadLimit
from gateway.hub import Hub
from gateway.kinds import advertise
from gateway.presence import Presence
from gateway.protocol import (
    Close,
    ErrorCode,
    Ping,
    PresenceRequest,
    PresenceStats,
    Publish,
    Refresh,
    RequestError,
    Subscribe,
    Unsubscribe,
    error,
    parse_channel_list,
    parse_request,
    presence,
    presence_stats,
    refreshed,
    reply,
    subscribed,
)
from gateway.ratelimit import TokenBucket
from gateway.session import INBOX, Limits, Session, SessionConnection, Unacceptable
from gateway.settings import Settings
from gateway.stats import Stats
from gateway.telemetry import Telemetry
from gateway.throttle import Throttle
from gateway.users import Users
from publisher.control import CONTROL_CHANNEL
from publisher.envelope import EnvelopeError, build_envelope

__all__ = ["Gateway"]

log = logging.getLogger("gateway")

WS_PATH = "/ws"
#: Seconds a connection waits between two refreshes (each decodes a token), and the refused
#: refreshes in a row after which it is closed (1008).
REFRESH_INTERVAL = 1.0
MAX_REFUSALS = 3
#: Completed connections waiting to be accepted.
LISTEN_BACKLOG = 4096


class Gateway:
    """One replica. ``await start()``, later ``await shutdown()``."""

    def __init__(
        self,
        settings: Settings,
        *,
        meter_provider: MeterProvider | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.settings = settings
        self.stats = Stats()
        #: Names this replica in acknowledgements (and logs): the host (a pod's name on
        #: Kubernetes), the process, and a few random characters for replicas in one process.
        self.name = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:6]}"
        self.telemetry = Telemetry(
            prometheus=settings.metrics == "on",
            meter_provider=meter_provider,
            tracer_provider=tracer_provider,
        )
        self.stats.record_queue_depth = self.telemetry.queue_depth.record
        self.stats.record_latency = self.telemetry.delivery_latency.record
        self.hub = Hub(
            functools.partial(create_backplane, settings),
            self.stats,
            self.telemetry,
            coalescing=Coalescing(
                Mode(settings.coalesce), settings.coalesce_window, settings.coalesce_busy
            ),
            max_batch_bytes=settings.write_limit,
            read_limit=ReadLimit(settings.replay_max_messages, settings.replay_max_bytes),
            max_envelope_bytes=settings.max_envelope_bytes,
            backlog=Backlog(settings.backlog_messages, settings.backlog_bytes),
            deltas=settings.patterns(settings.delta_channels),
            delta_max_bytes=settings.delta_max_bytes,
        )
        self.auth = _authenticator(settings)
        self.limits = Limits(
            max_messages=settings.queue_max_messages,
            max_bytes=settings.queue_max_bytes,
            policy=settings.slow_consumer_policy,
            close_timeout=settings.close_timeout,
            rate=settings.rate_limit,
            max_subscriptions=settings.max_subscriptions,
            ping_interval=settings.ping_interval,
            ping_timeout=settings.ping_timeout,
        )
        self.sessions: set[Session] = set()
        self.admission: Admission[SessionConnection] = Admission(
            max_sockets=socket_capacity(settings),
            max_handshakes=settings.max_handshakes,
            max_header_bytes=settings.max_header_bytes,
        )
        # Who each accepted handshake is and what it asked for, until its session starts.
        # Kept here rather than on the connection: two more attributes there would turn its
        # instance dict from a shared-key one into a full one, 1.3 KiB more per client.
        self._admitted: weakref.WeakKeyDictionary[
            ServerConnection, tuple[Identity, tuple[str, ...]]
        ] = weakref.WeakKeyDictionary()
        #: Open connections by user (token sub): the per-user limit, control requests.
        self.users: Users[Session] = Users()
        self.control = Control(
            self.name,
            self.users,
            self.hub.backplane,
            self._subscribe,
            self.hub.unsubscribe,
            self.stats,
            self.telemetry,
        )
        self.hub.listen(CONTROL_CHANNEL, self.control.receive)
        self.presence = Presence(
            self.name,
            self.hub.backplane,
            settings.presence(),
            self.stats,
            self.telemetry.tracer,
        )
        self.hub.on_joined = self.presence.joined
        self.hub.on_left = self.presence.left
        backplane = self.hub.backplane
        resume_hub = backplane.on_resume

        def resumed() -> None:
            if resume_hub is not None:
                resume_hub()
            self.presence.resumed()

        backplane.on_resume = resumed
        self.congested: set[Session] = set()  # transports that filled up; the stall watch
        self.draining = False
        self.server: Server | None = None
        self._all_closed = asyncio.Event()
        self._stop_draining = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        #: Tasks letting go of what closed sessions held.
        self._endings: set[asyncio.Task[None]] = set()
        self._refusals = Throttle()
        self.demo_page = settings.demo_page == "on" or (
            settings.demo_page == "auto" and settings.redis_url is None
        )
        #: The native id of the thread running the replica's loop, once started.
        self.loop_thread: int | None = None
        self.telemetry.observe(self)

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
            return False, self.hub.backplane.unready_reason()
        return True, "ready"

    async def start(self) -> None:
        s = self.settings
        self.loop_thread = threading.get_native_id()
        self._log_capacity()
        await self.hub.backplane.start()
        # A subclass per replica carries its socket options and stall watch, so replicas in
        # one process (tests) do not share them.
        connection_class = type(
            "SessionConnection",
            (SessionConnection,),
            {
                "send_buffer": s.send_buffer,
                "on_congested": self._congested,
                "on_latency": self.telemetry.keepalive_rtt.record,
                "admission": self.admission,
                "on_refused": self._count_refusal,
                "check_request": self._process_request,
                "check_response": self._process_response,
                "open_timeout": s.open_timeout,
                "open_session": self._open_session,
                "on_message": self._received,
                "on_closed": self._closed,
            },
        )
        self.server = await serve(
            _never,  # SessionConnection runs the handshake and starts the session itself
            s.host,
            s.port,
            create_connection=connection_class,
            process_request=self._process_request,
            process_response=self._process_response,
            origins=_origins(s),
            compression="deflate" if s.compression == "deflate" else None,
            max_size=s.max_message_size,
            # Frames received and not yet handled, beyond which the socket is not read: with
            # max_size, what a client can make the replica hold of what it sent.
            max_queue=INBOX,
            ping_interval=None,  # one sweep pings every connection: see _sweep
            close_timeout=s.close_timeout,
            open_timeout=s.open_timeout,
            write_limit=s.write_limit,
            server_header="wsgateway",
            # Connections the kernel completes before the replica accepts them: with the
            # default 100, a burst of connections (a reconnect storm, a flood) overflows it
            # and the SYNs dropped cost the clients a second each. The kernel caps it at
            # net.core.somaxconn.
            backlog=LISTEN_BACKLOG,
        )
        self._tasks.append(asyncio.create_task(self._sweep(), name="sweep"))
        self._tasks.append(asyncio.create_task(lag.watch(self._observe_load), name="load"))
        self._tasks.append(asyncio.create_task(self.control.serve(), name="control"))
        self._tasks.append(
            asyncio.create_task(
                advertise(self.hub.backplane, self.hub.backplane.history_policy, self.stats),
                name="kinds",
            )
        )
        if self.presence.policy.patterns:
            self._tasks.append(asyncio.create_task(self.presence.serve(), name="presence"))

    def _observe_load(self, lag_seconds: float, cpu: float, wait: float) -> None:
        self.telemetry.loop_lag.record(lag_seconds)
        stats = self.stats
        self.hub.coalescing.observe(
            cpu, lag_seconds, lag.INTERVAL, stats.fanout, stats.writes, wait
        )

    def _log_capacity(self) -> None:
        s = self.settings
        files, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        sockets = self.admission.max_sockets
        log.info(
            "file descriptor limit %d: up to %d client sockets (%d kept for Redis and probes)",
            files,
            sockets,
            s.fd_reserve,
        )
        if sockets < s.max_connections + s.max_handshakes:
            log.warning(
                "the file limit allows %d client sockets, fewer than GATEWAY_MAX_CONNECTIONS "
                "(%d) plus GATEWAY_MAX_HANDSHAKES (%d): sockets beyond it are refused",
                sockets,
                s.max_connections,
                s.max_handshakes,
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
        if url.path == "/metrics" and self.telemetry.registry is not None:
            response = connection.respond(
                http.HTTPStatus.OK, generate_latest(self.telemetry.registry).decode()
            )
            _set_header(response, "Content-Type", CONTENT_TYPE_LATEST)
            return response
        if url.path in demo.PATHS and self.demo_page:
            text, content_type = demo.asset(url.path)
            response = connection.respond(http.HTTPStatus.OK, text)
            for name, value in {"Content-Type": content_type, **demo.HEADERS}.items():
                _set_header(response, name, value)
            return response
        if url.path != WS_PATH:
            return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        if self.draining:
            return self._refuse(connection, http.HTTPStatus.SERVICE_UNAVAILABLE, "draining")
        if len(self.sessions) + len(self._admitted) >= self.settings.max_connections:
            self.stats.refused["capacity"] += 1
            return self._refuse(connection, http.HTTPStatus.SERVICE_UNAVAILABLE, "at capacity")
        query = parse_qs(url.query, keep_blank_values=True)
        channels: list[str] = []
        for value in query.get("channels", ()):
            if not value:
                continue
            try:
                channels.extend(c for c in parse_channel_list(value) if c not in channels)
            except ValueError as exc:
                return self._refuse(connection, http.HTTPStatus.BAD_REQUEST, f"channels: {exc}")
        authorization = request.headers.get_all("Authorization")
        if len(authorization) + len(query.get("token", ())) > 1:
            # Which one should win is anybody's guess: refuse rather than pick.
            return self._refuse(connection, http.HTTPStatus.BAD_REQUEST, "more than one token")
        tokens = query.get("token", [])
        token = tokens[0] if tokens else bearer_token(authorization[0] if authorization else None)
        try:
            identity = self.auth.authenticate(token)
        except AuthError as exc:
            self.stats.refused["auth"] += 1
            return self._refuse(connection, http.HTTPStatus.UNAUTHORIZED, str(exc))
        if self._over_user_limit(identity.subject):
            self.stats.refused["user_limit"] += 1
            return self._refuse(
                connection,
                http.HTTPStatus.TOO_MANY_REQUESTS,
                "too many connections for this user on this replica",
            )
        # Put on without asking: the token's subs, then (if enabled) the personal channel.
        personal = identity.personal if self.settings.personal_channels == "on" else None
        for channel in (*identity.subs, *([personal] if personal else [])):
            if channel not in channels:
                channels.append(channel)
        self._admitted[connection] = (identity, tuple(channels))
        return None

    def _over_user_limit(self, subject: str | None) -> bool:
        """Whether one more connection of ``subject`` would pass the per-user limit; those
        still in their handshake count too (a bounded few: GATEWAY_MAX_HANDSHAKES)."""
        limit = self.settings.max_connections_per_user
        if subject is None or not limit:
            return False
        held = self.users.count(subject)
        opening = sum(1 for identity, _ in self._admitted.values() if identity.subject == subject)
        return held + opening >= limit

    def _process_response(
        self, connection: ServerConnection, request: Request, response: Response
    ) -> None:
        """A span for every refused WebSocket handshake (the library's refusals included)."""
        if response.status_code == 101:
            assert isinstance(connection, SessionConnection)
            self.admission.opened(connection)
        tracer = self.telemetry.tracer
        path = urlsplit(request.path).path
        if tracer is not None and path == WS_PATH and response.status_code != 101:
            with tracer.start_as_current_span(
                "handshake",
                kind=SpanKind.SERVER,
                attributes={
                    "http.response.status_code": response.status_code,
                    "url.path": path,
                    "error.type": str(response.status_code),
                },
            ) as span:
                span.set_status(StatusCode.ERROR, response.reason_phrase)

    def _count_refusal(self, reason: str) -> None:
        """A socket refused or cut before its handshake ended (see gateway.admission)."""
        self.stats.refused[reason] += 1
        if self._refusals.ready():
            log.warning(
                "refused a socket (%s): %d sockets, %d handshakes in flight; "
                "%d more refusals since the last line",
                _SOCKET_REFUSALS[reason],
                self.admission.sockets,
                self.admission.handshakes,
                self._refusals.take_suppressed(),
            )

    def _refuse(self, connection: ServerConnection, status: http.HTTPStatus, why: str) -> Response:
        if self._refusals.ready():
            log.info(
                "refused a handshake (%d %s) from %s; %d more since the last line",
                status,
                why,
                connection.remote_address,
                self._refusals.take_suppressed(),
            )
        return connection.respond(status, why + "\n")

    # One client

    async def _open_session(self, connection: SessionConnection) -> None:
        """Start the session of a connection whose handshake succeeded: its subscriptions
        from the query string first, then its requests as they come."""
        identity, initial_channels = self._admitted.pop(connection)
        session = Session(connection, identity, self.stats, self.limits)
        self.users.add(session)
        self.sessions.add(session)
        self.stats.connections_opened += 1
        self.stats.connections_open += 1
        connection.take_messages(session)
        await self._serve(session, initial_channels)

    def _received(self, session: Session, message: str | bytes | Unacceptable) -> None:
        if session.received(message):
            session.worker = asyncio.create_task(self._serve(session))

    async def _serve(self, session: Session, channels: tuple[str, ...] = ()) -> None:
        """Serve a session's requests in order, until none is waiting (the task serving
        them exists only while some are)."""
        session.worker = asyncio.current_task()
        connection = session.connection
        try:
            for channel in channels:
                try:
                    await self._subscribe(session, channel, None)
                except RequestError as exc:
                    session.send(error(exc))
            while (message := session.next_request()) is not None:
                if session.closing or connection.protocol.state is not OPEN:
                    # A client that is leaving (or gone) does not get what it asked for
                    # before it left.
                    continue
                if isinstance(message, bytes):
                    session.close(Close.BINARY_NOT_ACCEPTED, "binary frames are not accepted")
                    continue
                if isinstance(message, Unacceptable):
                    connection.fail(message.code, message.reason)
                    continue
                await self._serve_request(session, message)
        except Exception:
            log.exception("serving connection %s failed", connection.id)
            session.close(Close.INTERNAL_ERROR, "internal error")
        finally:
            session.worker = None

    def _closed(self, session: Session) -> None:
        task = asyncio.create_task(self._end(session))
        self._endings.add(task)
        task.add_done_callback(self._endings.discard)

    async def _end(self, session: Session) -> None:
        """Everything a closed session held, let go (after the request it was being served,
        which may have been a subscription)."""
        try:
            if session.worker is not None:
                await asyncio.wait([session.worker])
            await self.hub.leave(session)
        except Exception:
            log.exception("letting go of connection %s failed", session.connection.id)
        finally:
            self.sessions.discard(session)
            self.congested.discard(session)
            if not self.sessions:
                self._all_closed.set()
            self.stats.connections_open -= 1
            self.users.discard(session)
            self._count_close(session)
            session.finish()

    def _count_close(self, session: Session) -> None:
        connection = session.connection
        if session.close_code is not None:
            code = session.close_code
            reason = session.close_cause or _close_reason(code)
        else:
            # Closed by the library (1009 too big, 1007 not UTF-8, 1002), by the client, or by
            # the network (1006). The code is the first close frame's: the library's when it
            # closed first, even if the client never answered (connection.close_code would
            # say 1006 then).
            protocol = connection.protocol
            sent, received = protocol.close_sent, protocol.close_rcvd
            if sent is not None and not protocol.close_rcvd_then_sent:
                code = sent.code
                reason = "limit" if code == Close.MESSAGE_TOO_BIG else "protocol"
            else:
                code = received.code if received is not None else 1006
                reason = "client" if code in (1000, 1001) else "error"
        self.stats.closes[(code, reason)] += 1
        tracer = self.telemetry.tracer
        if tracer is not None:
            attributes: dict[str, str | int] = {
                "websocket.close.code": code,
                "wsgateway.close.reason": reason,
            }
            if session.subject is not None:
                attributes["enduser.id"] = session.subject
            tracer.start_span("close", kind=SpanKind.SERVER, attributes=attributes).end()
        dropped = session.outbox.dropped if session.outbox is not None else 0
        log.debug(
            "connection %s closed: %d (%s), %d messages dropped by policy %s",
            connection.id,
            code,
            reason,
            dropped,
            self.limits.policy,
        )

    async def _serve_request(self, session: Session, text: str) -> None:
        try:
            request = parse_request(text)
            if isinstance(request, Subscribe):
                since = request.since
                position = (since.offset, since.epoch) if since is not None else None
                await self._subscribe(
                    session,
                    request.channel,
                    request.id,
                    position,
                    request.latest,
                    request.delta is not None,
                )
            elif isinstance(request, Unsubscribe):
                await self.hub.unsubscribe(session, request.channel)
                session.send(reply("unsubscribed", request.id, request.channel))
            elif isinstance(request, Publish):
                await self._publish(session, request)
            elif isinstance(request, Ping):
                session.send(reply("pong", request.id))
            elif isinstance(request, Refresh):
                await self._refresh(session, request)
            elif isinstance(request, PresenceRequest | PresenceStats):
                await self._presence(session, request)
        except RequestError as exc:
            session.send(error(exc))

    async def _refresh(self, session: Session, request: Refresh) -> None:
        """A new token in-band: same subject, new expiry and rights; the channels it no
        longer allows are left, each told to the client. A refused token changes nothing:
        the connection keeps its current token until that one expires (4001)."""
        if session.subject is None:
            raise RequestError(
                ErrorCode.BAD_REQUEST, "this connection has no token to refresh", request.id
            )
        # Each refresh decodes a token (up to GATEWAY_MAX_TOKEN_BYTES): a second apart at
        # least, and a connection that keeps sending refused ones is closed.
        now = session.connection.loop.time()
        if now - session.refreshed_at < REFRESH_INTERVAL:
            raise RequestError(
                ErrorCode.LIMIT, f"at most one refresh every {REFRESH_INTERVAL:g} s", request.id
            )
        session.refreshed_at = now
        try:
            identity = self.auth.refresh(session.subject, request.token)
        except AuthError as exc:
            self.stats.refreshes["refused"] += 1
            session.refusals += 1
            refused = RequestError(ErrorCode.FORBIDDEN, f"refresh refused: {exc}", request.id)
            if session.refusals < MAX_REFUSALS:
                raise refused from None
            session.send(error(refused))
            session.close(Close.POLICY_VIOLATION, "refreshes refused", cause="refresh")
            return
        session.refusals = 0
        self.stats.refreshes["ok"] += 1
        session.renew(identity)
        for channel in sorted(c for c in session.channels if not session.access.can_subscribe(c)):
            await self.hub.unsubscribe(session, channel)
            session.send(reply("unsubscribed", None, channel, reason="forbidden"))
        session.send(refreshed(request.id, identity.expires_at))

    async def _presence(self, session: Session, request: PresenceRequest | PresenceStats) -> None:
        channel = request.channel
        if not self.presence.policy.applies(channel):
            raise RequestError(
                ErrorCode.BAD_REQUEST, f"channel {channel!r} has no presence", request.id
            )
        if not session.access.can_read_presence(channel):
            raise RequestError(
                ErrorCode.FORBIDDEN, f"not allowed to read the presence of {channel!r}", request.id
            )
        # A 40-byte request may bring back hundreds of KB and costs the shared Redis a scan:
        # each connection gets a small rate of them of its own.
        rate = self.settings.presence_read_rate
        now = session.connection.loop.time()
        if session.presence_reads is None:
            session.presence_reads = TokenBucket(rate, max(1.0, 10 * rate), now)
        if not session.presence_reads.take(now):
            raise RequestError(
                ErrorCode.LIMIT, f"presence reads are limited to {rate:g} a second", request.id
            )
        try:
            if isinstance(request, PresenceStats):
                clients, users = await self.presence.stats_of(channel)
                session.send(presence_stats(channel, request.id, clients, users))
                return
            limit = min(request.limit or self.presence.policy.page, self.presence.policy.page)
            cursor, members = await self.presence.page(channel, request.cursor, limit)
        except BackplaneUnavailable as exc:
            raise RequestError(ErrorCode.UNAVAILABLE, str(exc), request.id) from None
        session.send(presence(channel, request.id, members, cursor))

    async def _subscribe(
        self,
        session: Session,
        channel: str,
        request_id: int | None = None,
        since: tuple[int, str] | None = None,
        latest: bool | None = None,
        delta: bool = False,
    ) -> None:
        if not session.access.can_subscribe(channel):
            raise RequestError(
                ErrorCode.FORBIDDEN, f"not allowed to subscribe to {channel!r}", request_id
            )
        limit = self.limits.max_subscriptions
        if channel not in session.channels and len(session.channels) >= limit:
            raise RequestError(
                ErrorCode.LIMIT, f"at most {limit} subscriptions per connection", request_id
            )
        already = channel in session.channels
        try:
            joined = await self.hub.subscribe(session, channel, since, latest, delta)
        except BackplaneUnavailable as exc:
            raise RequestError(ErrorCode.UNAVAILABLE, str(exc), request_id) from None
        if joined is None:
            # Already subscribed (nothing was missed; the reply says what the subscription
            # is), or not a history channel (nothing can be resumed).
            recovered = False if since is not None and not already else None
            takes_deltas = already and self.hub.takes_deltas(session, channel)
            session.send(subscribed(channel, request_id, recovered=recovered, delta=takes_deltas))
            return
        recovery = joined.recovery
        session.send(
            subscribed(
                channel,
                request_id,
                recovered=recovery.recovered if since is not None else None,
                offset=recovery.position,
                epoch=recovery.epoch,
                latest=joined.latest,
                delta=delta and self.hub.allows_delta(channel),
            )
        )
        session.replay(joined.replay)

    async def _publish(self, session: Session, request: Publish) -> None:
        if not session.access.can_publish(request.channel):
            raise RequestError(
                ErrorCode.FORBIDDEN, f"not allowed to publish to {request.channel!r}", request.id
            )
        try:
            envelope = build_envelope(request.channel, msgspec.json.decode(request.data))
        except (EnvelopeError, msgspec.DecodeError) as exc:  # numbers it cannot hold too
            raise RequestError(ErrorCode.BAD_REQUEST, f"data: {exc}", request.id) from None
        except RecursionError:
            raise RequestError(
                ErrorCode.BAD_REQUEST, "data nested too deeply", request.id
            ) from None
        try:
            await self.hub.backplane.publish(request.channel, envelope)
        except BackplaneUnavailable as exc:
            raise RequestError(ErrorCode.UNAVAILABLE, str(exc), request.id) from None
        session.send(reply("published", request.id))

    # Stalled clients

    def _congested(self, session: Session) -> None:
        session.congested_at = session.connection.loop.time()
        self.congested.add(session)

    async def _sweep(self) -> None:
        """Once a tick, for all connections: keepalive pings, and stalled clients cut off.

        One task for the replica instead of the library's keepalive task per connection
        saves about 1.5 KiB per connection. Clients whose transport stayed full for
        ``stall_timeout`` are cut off: websockets' own close() and ping() wait for the buffer
        to drain with no deadline, so neither a keepalive nor a close would end them.
        """
        s = self.settings
        tick = min(1.0, s.stall_timeout / 4, s.ping_interval / 4, s.ping_timeout / 4)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            for session in list(self.sessions):
                session.keepalive(now)
            self._cut_off_stalled(now)

    def _cut_off_stalled(self, now: float) -> None:
        timeout = self.settings.stall_timeout
        for session in list(self.congested):
            if not session.connection.paused:
                self.congested.discard(session)  # drained since
            elif session.congested_at is not None and now - session.congested_at >= timeout:
                self.congested.discard(session)
                self.stats.stalled += 1
                log.info(
                    "cutting off stalled client %s after %.1fs",
                    session.connection.id,
                    now - session.congested_at,
                )
                # Its buffers are full: a close frame could not reach it anyway.
                session.close(Close.SLOW_CONSUMER, "stalled", abort_after=0)

    # Shutdown

    def stop_draining(self) -> None:
        """A second signal: close whoever is left now instead of over the drain window."""
        self._stop_draining.set()

    async def shutdown(self) -> None:
        """Fail readiness and refuse new clients at once, then close every client with 1001
        in batches spread over ``drain_seconds`` so they do not all reconnect in the same
        instant, and stop before ``shutdown_timeout``.
        """
        s = self.settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.shutdown_timeout
        self.draining = True
        log.info("draining %d connections over %.1fs", len(self.sessions), s.drain_seconds)
        self._all_closed.clear()
        if self.sessions:
            await self._drain(loop.time() + s.drain_seconds)
            # Session.close resets any connection whose handshake outlives close_timeout.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline - 0.5):
                    await self._all_closed.wait()
        if self.sessions:
            log.warning("cutting off %d connections at the shutdown deadline", len(self.sessions))
            for session in list(self.sessions):
                session.abort()
        for task in self._tasks:
            task.cancel()
        if self.presence.policy.patterns:
            await self.presence.stop()
        if self.server is not None:
            self.server.close(close_connections=False)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    await self.server.wait_closed()
                    if self._endings:  # what the last closed sessions held, let go
                        await asyncio.wait(list(self._endings))
        await self.hub.backplane.close()
        self.telemetry.shutdown()
        log.info("stopped")

    async def _drain(self, end: float) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        # Each connection gets a uniformly random moment in the window; a 100 ms tick closes
        # those whose moment has come, so reconnects arrive as an even trickle.
        schedule = sorted(
            ((random.uniform(start, end), id(session), session) for session in self.sessions),
            key=lambda entry: entry[0],
        )
        index = 0
        while index < len(schedule):
            now = float("inf") if self._stop_draining.is_set() else loop.time()
            while index < len(schedule) and schedule[index][0] <= now:
                schedule[index][2].close(Close.GOING_AWAY, "server shutting down")
                index += 1
            if index < len(schedule):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.1):
                        await self._stop_draining.wait()


def _set_header(response: Response, name: str, value: str) -> None:
    # websockets' Headers is a multi-dict: assigning adds a second header, it does not replace.
    if name in response.headers:
        del response.headers[name]
    response.headers[name] = value


def _origins(settings: Settings) -> list[Origin | re.Pattern[str] | None] | None:
    """The Origin allow-list in the form websockets takes; None allows any origin."""
    if settings.allowed_origins is None:
        return None
    rules: list[Origin | re.Pattern[str] | None] = [None]  # no Origin header: not a browser
    for entry in settings.patterns(settings.allowed_origins):
        rules.append(re.compile(entry[3:]) if entry.startswith("re:") else Origin(entry))
    return rules


def _authenticator(settings: Settings) -> Authenticator:
    anonymous = Access(
        subscribe=settings.patterns(settings.anonymous_channels),
        publish=settings.patterns(settings.anonymous_publish),
        presence=settings.patterns(settings.anonymous_presence),
    )
    return Authenticator(
        secret=settings.jwt_secret.get_secret_value() if settings.jwt_secret else None,
        public_key=(
            settings.jwt_public_key_file.read_text() if settings.jwt_public_key_file else None
        ),
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
        leeway=settings.jwt_leeway,
        max_token_bytes=settings.max_token_bytes,
        anonymous=anonymous,
    )


_SOCKET_REFUSALS = {
    "descriptors": "no descriptor to spare: GATEWAY_FD_RESERVE is kept for Redis and probes",
    "handshakes": "the oldest handshake made room for it: GATEWAY_MAX_HANDSHAKES",
    "headers": "request over GATEWAY_MAX_HEADER_BYTES",
}


def socket_capacity(settings: Settings) -> int:
    """Client sockets a replica may hold: its file limit less the reserve for everything
    else (Redis connections, the listening socket, logs), never more than it could use."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = settings.max_connections + settings.max_handshakes
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - settings.fd_reserve))


_CLOSE_REASONS: dict[int, str] = {
    Close.SLOW_CONSUMER: "slow_consumer",
    Close.GOING_AWAY: "drain",
    Close.POLICY_VIOLATION: "rate_limit",
    Close.TOKEN_EXPIRED: "auth",
    Close.BINARY_NOT_ACCEPTED: "protocol",
}


async def _never(connection: ServerConnection) -> None:
    raise AssertionError("SessionConnection starts its session itself")


def _close_reason(code: int) -> str:
    """The low-cardinality reason of a close the gateway decided on."""
    return _CLOSE_REASONS.get(code, "error")

"""Control requests from services, on the replica: act on one user's connections, answer.

The request format and the acknowledgement are :mod:`publisher.control`'s. Requests arrive on
the reserved channel (every replica keeps it subscribed from start) and wait in a bounded
queue for one worker task, in the order they arrived: a flood of requests costs at most
``QUEUE`` of them in memory, the rest are dropped and counted, never a task each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from opentelemetry.trace import Span, StatusCode

from gateway.backplane import Backplane, BackplaneUnavailable
from gateway.protocol import RequestError, error, reply
from gateway.throttle import Throttle
from publisher.control import (
    MAX_REQUEST_BYTES,
    Ack,
    ControlRequest,
    RefusedControl,
    parse_control,
)

if TYPE_CHECKING:
    from gateway.session import Session
    from gateway.stats import Stats
    from gateway.telemetry import Telemetry
    from gateway.users import Users

__all__ = ["QUEUE", "Control"]

log = logging.getLogger("gateway.control")

#: Requests received and not yet acted on, beyond which new ones are dropped.
QUEUE = 1024

#: Put a session on a channel as the gateway's own subscribe does (history, replies, limits).
Subscriber = Callable[["Session", str], Awaitable[None]]


class Control:
    def __init__(
        self,
        replica: str,
        users: Users[Session],
        backplane: Backplane,
        subscribe: Subscriber,
        unsubscribe: Callable[[Session, str], Awaitable[bool]],
        stats: Stats,
        telemetry: Telemetry,
    ) -> None:
        self.replica = replica
        self.users = users
        self.backplane = backplane
        self._subscribe = subscribe
        self._unsubscribe = unsubscribe
        self.stats = stats
        self.telemetry = telemetry
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(QUEUE)
        self._log = Throttle()

    def receive(self, payload: bytes) -> None:
        """A request from the backplane; never blocks. One larger than any valid request
        is refused unread: the queue holds at most QUEUE times MAX_REQUEST_BYTES."""
        if len(payload) > MAX_REQUEST_BYTES:
            self._count("-", "malformed")
            self._warn("dropped a control request of %d bytes, unread", len(payload))
            return
        try:
            self._queue.put_nowait(payload)
        except asyncio.QueueFull:
            self._count("-", "dropped")
            self._warn("dropped a control request: %d are waiting already", QUEUE)

    async def serve(self) -> None:
        """Act on the requests as they come, one at a time, until cancelled."""
        while True:
            payload = await self._queue.get()
            try:
                await self.act(payload)
            except Exception:  # a bug: the next request still gets served
                log.exception("control request failed")

    async def act(self, payload: bytes) -> int | None:
        """Carry out one encoded request; return the connections it reached (None if
        malformed)."""
        try:
            request = parse_control(payload)
        except RefusedControl as exc:
            self._count("-", "malformed")
            self._warn("dropped a malformed control request (%s)", exc)
            if exc.request_id is not None:  # the service waits for an answer: it gets why
                await self._acknowledge(
                    exc.request_id, Ack(replica=self.replica, connections=0, error=str(exc)), None
                )
            return None
        span = self.telemetry.control(
            request.op, request.user, request.traceparent, request.tracestate
        )
        if span is not None and request.channel is not None:
            span.set_attribute("messaging.destination.name", request.channel)
        reached = 0
        for session in self.users.sessions(request.user):
            if await self._act_on(session, request):
                reached += 1
        self._count(request.op, "ok")
        self.stats.control_connections[request.op] += reached
        if request.id is not None:
            await self._acknowledge(
                request.id, Ack(replica=self.replica, connections=reached), span
            )
        if span is not None:
            span.set_attribute("wsgateway.control.connections", reached)
            span.end()
        return reached

    async def _acknowledge(self, request_id: str, ack: Ack, span: Span | None) -> None:
        try:
            await self.backplane.acknowledge(
                request_id, ack.model_dump_json(exclude_none=True).encode()
            )
        except BackplaneUnavailable as exc:
            self._warn("could not acknowledge control request %s: %s", request_id, exc)
            if span is not None:
                span.set_status(StatusCode.ERROR, str(exc))

    async def _act_on(self, session: Session, request: ControlRequest) -> bool:
        """Whether ``session`` was changed (it may be closing, or already as asked)."""
        if session.closing:
            return False
        if request.op == "disconnect":
            session.close(request.code, request.close_reason, cause="control")
            return True
        channel = request.channel
        assert channel is not None  # the model checks it
        if request.op == "unsubscribe":
            session.access = session.access.unplacing(channel)
            if not await self._unsubscribe(session, channel):
                return False
            session.send(reply("unsubscribed", None, channel, reason="server"))
            return True
        session.access = session.access.placing(channel)
        if channel in session.channels:
            return False
        try:
            await self._subscribe(session, channel)
        except RequestError as exc:  # over its limit, or Redis: told as its own would be
            session.access = session.access.unplacing(channel)
            session.send(error(exc))
            return False
        return channel in session.channels

    def _count(self, op: str, result: str) -> None:
        self.stats.control[(op, result)] += 1

    def _warn(self, text: str, *args: object) -> None:
        if self._log.ready():
            log.warning(text + "; %d more since the last line", *args, self._log.take_suppressed())

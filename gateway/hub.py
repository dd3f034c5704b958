"""The hub: which local sessions want which channel, and the fan-out of each message.

A channel's first local subscriber subscribes the backplane to it and its last one leaving
unsubscribes it, so a replica receives only what its own clients want. Each message is decoded
and encoded once, then the same :class:`~gateway.protocol.Outbound` goes to every subscriber.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.backplane import Backplane, BackplaneUnavailable, OnMessage
from gateway.envelope import Envelope, MalformedEnvelope, decode_envelope
from gateway.protocol import message
from gateway.session import Session
from gateway.stats import Stats
from gateway.throttle import Throttle

if TYPE_CHECKING:
    from gateway.telemetry import Telemetry

__all__ = ["Hub"]

log = logging.getLogger("gateway.hub")


class _Channel:
    """The local side of one channel."""

    __slots__ = ("joining", "members", "pending")

    def __init__(self) -> None:
        # Sessions that receive the channel's messages (a dict as an insertion-ordered set).
        self.members: dict[Session, None] = {}
        # Sessions waiting for the backplane to confirm the channel; they join the members
        # just before their "subscribed" reply, so no message ever precedes that reply.
        self.joining: set[Session] = set()
        self.pending: asyncio.Task[None] | None = None


class Hub:
    def __init__(
        self,
        make_backplane: Callable[[OnMessage], Backplane],
        stats: Stats,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.stats = stats
        self.telemetry = telemetry
        self.backplane = make_backplane(self.dispatch)
        self._channels: dict[str, _Channel] = {}
        self._malformed_log = Throttle()

    @property
    def channels(self) -> int:
        return len(self._channels)

    def subscribers(self, channel: str) -> int:
        local = self._channels.get(channel)
        return len(local.members) if local is not None else 0

    def dispatch(self, channel: str, payload: bytes) -> None:
        """Fan one envelope out to the local subscribers of ``channel``. Never blocks."""
        stats = self.stats
        stats.messages_received += 1
        local = self._channels.get(channel)
        if local is None or not local.members:
            return
        try:
            envelope = decode_envelope(payload, channel)
        except MalformedEnvelope as exc:
            stats.malformed[exc.reason] += 1
            self._log_malformed(channel, exc)
            return
        telemetry = self.telemetry
        if telemetry is None:
            self._fan_out(envelope, local.members)
            return
        started = time.perf_counter()
        if telemetry.tracer is None:
            self._fan_out(envelope, local.members)
        else:
            with telemetry.consume(envelope) as span:
                span.set_attribute("wsgateway.deliveries", self._fan_out(envelope, local.members))
        telemetry.fanout_duration.record(time.perf_counter() - started)
        telemetry.delivery_latency.record(max(0.0, time.time() - envelope.ts / 1000))

    def _fan_out(self, envelope: Envelope, members: dict[Session, None]) -> int:
        item = message(envelope)
        for session in members:
            session.send(item)
        self.stats.fanout += len(members)
        return len(members)

    def _log_malformed(self, channel: str, exc: MalformedEnvelope) -> None:
        # One line a second at most: a broken publisher must not flood the log.
        if self._malformed_log.ready():
            log.warning(
                "dropped malformed envelope on channel %s (%s): %s; %d so far",
                channel,
                exc.reason,
                exc,
                sum(self.stats.malformed.values()),
            )

    async def subscribe(self, session: Session, channel: str) -> None:
        """Add ``session`` to ``channel``; return once messages published from now on reach it.

        Raises :class:`BackplaneUnavailable` (and leaves the session unsubscribed) when the
        backplane cannot confirm the subscription.
        """
        if channel in session.channels:
            return
        local = self._channels.get(channel)
        if local is None:
            local = self._channels[channel] = _Channel()
            local.pending = asyncio.create_task(
                self.backplane.subscribe(channel), name=f"subscribe {channel}"
            )
            local.pending.add_done_callback(lambda task: self._settled(channel, local, task))
        session.channels.add(channel)
        if local.pending is None:
            local.members[session] = None
            return
        local.joining.add(session)
        try:
            await asyncio.shield(local.pending)
        except BackplaneUnavailable:
            session.channels.discard(channel)
            raise
        if session in local.joining:  # else it left while waiting
            local.joining.discard(session)
            local.members[session] = None

    async def unsubscribe(self, session: Session, channel: str) -> bool:
        """Remove ``session`` from ``channel``; False if it was not subscribed."""
        if channel not in session.channels:
            return False
        session.channels.discard(channel)
        local = self._channels.get(channel)
        if local is not None:
            local.members.pop(session, None)
            local.joining.discard(session)
            if not local.members and not local.joining:
                del self._channels[channel]
                await self.backplane.unsubscribe(channel)
        return True

    async def leave(self, session: Session) -> None:
        for channel in list(session.channels):
            await self.unsubscribe(session, channel)

    def _settled(self, channel: str, local: _Channel, task: asyncio.Task[None]) -> None:
        if local.pending is not task:
            return
        local.pending = None
        if task.cancelled() or task.exception() is not None:
            # Nobody is subscribed: the waiting sessions are told, and the next subscriber
            # starts afresh.
            local.joining.clear()
            if self._channels.get(channel) is local:
                del self._channels[channel]

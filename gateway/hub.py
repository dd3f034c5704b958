"""The hub: which local sessions want which channel, and the fan-out of each message.

A channel's first local subscriber subscribes the backplane to it and its last one leaving
unsubscribes it, so a replica receives only what its own clients want. Each message is decoded
and encoded once, then the same :class:`~gateway.protocol.Outbound` goes to every subscriber.

Messages are written per channel in batches: what the backplane hands over in one loop
iteration (all the messages of one socket read) and, with ``window`` > 0, what arrives within
``window`` seconds of the channel's last write is joined into one buffer, built once, and each
subscriber gets it in one write. Under load the system calls per delivery fall well below one;
at a quiet moment the first message still goes out on the next loop iteration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.backplane import Backplane, BackplaneUnavailable, OnMessage
from gateway.envelope import Envelope, MalformedEnvelope, decode_envelope
from gateway.protocol import Outbound, message
from gateway.session import Session
from gateway.stats import Stats
from gateway.throttle import Throttle

if TYPE_CHECKING:
    from gateway.telemetry import Telemetry

__all__ = ["Hub"]

log = logging.getLogger("gateway.hub")


class _Channel:
    """The local side of one channel."""

    __slots__ = (
        "batch",
        "batch_bytes",
        "flush",
        "joining",
        "last_write",
        "members",
        "pending",
        "received",
    )

    def __init__(self) -> None:
        # Sessions that receive the channel's messages (a dict as an insertion-ordered set).
        self.members: dict[Session, None] = {}
        # Sessions waiting for the backplane to confirm the channel; they join the members
        # just before their "subscribed" reply, so no message ever precedes that reply.
        self.joining: set[Session] = set()
        self.pending: asyncio.Task[None] | None = None
        # Messages waiting for the channel's next write, and (when tracing) their envelopes
        # with the time they arrived, for their spans.
        self.batch: list[Outbound] = []
        self.batch_bytes = 0
        self.received: list[tuple[Envelope, int]] = []
        self.flush: asyncio.Handle | None = None
        self.last_write = -math.inf  # loop time


def _deliver(members: dict[Session, None], batch: list[Outbound], frame: bytes) -> int:
    """Hand ``frame`` (``batch`` joined) to every member; return the direct writes made.

    The loop every delivery goes through, so it does as little as it can: one attribute and
    one call for a client that can take the frame straight away.
    """
    writes = 0
    remaining = iter(members)
    while True:
        session = None
        try:
            for session in remaining:
                write = session.direct
                if write is None:
                    session.deliver(batch, frame)
                else:
                    write(frame)
                    writes += 1
            return writes
        except Exception as exc:  # a transport that closed under us; the others go on
            if session is not None:
                session.direct = None
            log.debug("write failed: %s", exc)


class Hub:
    def __init__(
        self,
        make_backplane: Callable[[OnMessage], Backplane],
        stats: Stats,
        telemetry: Telemetry | None = None,
        *,
        coalesce: bool = True,
        window: float = 0.0,
        max_batch_bytes: int = 65536,
    ) -> None:
        self.stats = stats
        self.telemetry = telemetry
        self.coalesce = coalesce
        self.window = window
        self.max_batch_bytes = max_batch_bytes
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
        """Queue one envelope for the local subscribers of ``channel``. Never blocks."""
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
        item = message(envelope)
        local.batch.append(item)
        local.batch_bytes += len(item)
        telemetry = self.telemetry
        if telemetry is not None and telemetry.tracer is not None:
            local.received.append((envelope, time.time_ns()))
        if not self.coalesce or local.batch_bytes >= self.max_batch_bytes:
            self._write(local)
        elif local.flush is None:
            loop = asyncio.get_running_loop()
            delay = local.last_write + self.window - loop.time()
            if delay > 0:
                local.flush = loop.call_later(delay, self._write, local)
            else:
                local.flush = loop.call_soon(self._write, local)

    def _write(self, local: _Channel) -> None:
        """Hand the channel's waiting messages to every subscriber, one buffer for all."""
        if local.flush is not None:
            local.flush.cancel()
            local.flush = None
        batch = local.batch
        if not batch:
            return
        local.batch = []
        local.batch_bytes = 0
        received, local.received = local.received, []
        members = local.members
        telemetry = self.telemetry
        started = time.perf_counter()
        spans = [telemetry.consume(*args) for args in received] if telemetry and received else []
        frame = batch[0].frame if len(batch) == 1 else b"".join([item.frame for item in batch])
        # The last span is the current one while writing, so log lines carry its trace id.
        scope = telemetry.active(spans[-1]) if telemetry and spans else contextlib.nullcontext()
        with scope:
            writes = _deliver(members, batch, frame)
        self.stats.writes += writes
        self.stats.fanout += len(members) * len(batch)
        local.last_write = asyncio.get_running_loop().time()
        if telemetry is None:
            return
        telemetry.fanout_duration.record(time.perf_counter() - started)
        now = time.time()
        for item in batch:
            telemetry.delivery_latency.record(max(0.0, now - (item.ts or 0) / 1000))
        for span in spans:
            span.set_attribute("wsgateway.deliveries", len(members))
            span.end()

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
            self._write(local)  # what arrived before this subscription is not for it
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
            self._write(local)
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
                if local.flush is not None:
                    local.flush.cancel()
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

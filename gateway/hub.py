"""The hub: which local sessions want which channel, and the fan-out of each message.

A channel's first local subscriber subscribes the backplane to it and its last one leaving
unsubscribes it, so a replica receives only what its own clients want. Each message is decoded
and encoded once, then the same :class:`~gateway.protocol.Outbound` goes to every subscriber.

Messages are written per channel in batches: what the backplane hands over in one loop
iteration (all the messages of one socket read) and, while the coalescing window
(:mod:`gateway.coalescing`) is open, what arrives within it after the channel's last write (or
until a window's worth at the channel's rate has) is joined into one buffer, built once, and
each subscriber gets it in one write. Under load the system calls per delivery fall well below
one; at a quiet moment the first message still goes out on the next loop iteration. The
channels due in the same iteration are written together: a client subscribed to several of
them gets all their messages in one write.

History channels (see :mod:`gateway.history`) are delivered in offset order, once each: a
:class:`~gateway.history.Cursor` per channel drops duplicates, and a missing offset (or the
backplane coming back from an outage) holds the live messages while the missing ones are read
from the channel's stream. A subscriber that resumes from a position gets the messages it
missed before any live one, then the live ones after them, with nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from gateway.backlog import Backlog
from gateway.backoff import full_jitter
from gateway.backplane import Backplane, BackplaneUnavailable, OnMessage
from gateway.coalescing import Coalescing, gathered, next_gap
from gateway.deltas import Deltas, Variant, full_texts, texts
from gateway.envelope import Envelope, MalformedEnvelope, decode_envelope
from gateway.history import (
    EMPTY_EPOCH,
    Cursor,
    Page,
    ReadLimit,
    Recovery,
    Verdict,
    latest,
    recover,
)
from gateway.protocol import Outbound, message
from gateway.session import Session
from gateway.stats import Stats
from gateway.throttle import Throttle
from gateway.turns import Turns

if TYPE_CHECKING:
    from gateway.telemetry import Telemetry

__all__ = ["Hub", "Joined"]

#: Read the stream after this offset to learn only its epoch and top.
_TOP = 2**53
#: Reads of a stream to fill a gap before delivering what was held without it.
_FILL_ATTEMPTS = 5
#: History reads in flight at once: each may bring a whole ReadLimit of envelopes, so the
#: memory a burst of reads on many channels takes is bounded by this many of them.
_READS_AT_ONCE = 4
#: Seconds the backlog is fanned out for before the loop's other callbacks get their turn.
_FAN_OUT_SLICE = 0.002

log = logging.getLogger("gateway.hub")


class _Channel:
    """The local side of one channel."""

    __slots__ = (
        "arrived",
        "batch",
        "batch_bytes",
        "catching",
        "cursor",
        "decoded",
        "deltas",
        "due",
        "fetch",
        "flush",
        "gap",
        "held",
        "joining",
        "last_write",
        "latest_read",
        "members",
        "name",
        "newest",
        "next_read",
        "pending",
        "received",
        "state",
        "waiting",
    )

    def __init__(self, name: str, history: bool, state: bool = False) -> None:
        self.name = name
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
        self.flush: asyncio.Handle | None = None  # the window's end, while it holds them
        self.due = False  # in the hub's list of channels to write this iteration
        self.last_write = -math.inf  # loop time
        # Loop time of the last message, and the mean time between messages (smoothed over
        # the last few, each counted as at most the window): how many a window gathers.
        self.arrived = -math.inf
        self.gap = 0.0
        # History channels only: the last offset delivered; while a read of the stream fills
        # a gap, the live messages that arrive meanwhile (else None).
        self.cursor: Cursor | None = Cursor() if history else None
        self.held: list[Envelope] | None = None
        self.fetch: asyncio.Task[None] | None = None
        # Subscribers reading the stream to resume: what the channel delivers meanwhile is
        # kept for them. Then, until the channel has delivered up to the position they start
        # at (its epoch and offset), they get only the messages after it.
        self.waiting: dict[Session, list[Outbound]] = {}
        self.catching: dict[Session, tuple[str | None, int]] = {}
        # The history read that subscribers arriving now will share (see Hub._read_shared).
        self.next_read: _Read | None = None
        # The messages read from the stream that some client still has to receive: a later
        # read of the same offsets shares them instead of holding copies of its own.
        self.decoded: weakref.WeakValueDictionary[tuple[str | None, int], Outbound] | None = (
            weakref.WeakValueDictionary() if history else None
        )
        # State channels only: the newest message known (delivered, or read) with its epoch,
        # which subscribers that want the channel's state get without a read of Redis. One
        # message per channel.
        self.state = state
        self.newest: tuple[str, Outbound] | None = None
        # The read in flight that brings the newest message, which more subscribers that
        # want only that can share.
        self.latest_read: _Read | None = None
        # The subscribers that take deltas (apart from the members), the chain of texts and
        # the batch's variants (gateway.deltas); made with the first such subscriber and
        # gone with the last, so a channel without them pays one empty slot.
        self.deltas: Deltas | None = None

    @property
    def active(self) -> bool:
        deltas = self.deltas
        return bool(self.members or (deltas and deltas.synced) or self.waiting or self.catching)

    def wants_deltas(self, session: Session) -> bool:
        return self.deltas is not None and session in self.deltas.wanted

    def admit(self, session: Session) -> None:
        """``session`` receives the channel's messages from now on."""
        deltas = self.deltas
        if deltas is not None and session in deltas.wanted:
            deltas.synced[session] = -1  # its first message of the chain: the full text
        else:
            self.members[session] = None


class _Read:
    """One read of a channel's history, shared by the subscribers that asked together."""

    __slots__ = ("after", "done", "kept", "messages", "page")

    def __init__(self, after: int, messages: int) -> None:
        self.after = after
        self.messages = messages  # at most: one for those who want only the latest
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        #: A read that brings the newest message: what the channel delivered since it
        #: started, for subscribers who join it while it is in flight.
        self.kept: list[Outbound] = []
        #: The entries decoded and framed once for all readers (None: malformed).
        self.page: Page[Outbound | None] = Page(None, 0)


@dataclass(frozen=True, slots=True)
class Joined:
    """A subscription to a history channel: the client's starting point, what it missed
    (or, ``latest``, the channel's newest message: its state)."""

    recovery: Recovery[Outbound | None]
    replay: list[Outbound]
    latest: bool = False


def _settle(done: asyncio.Future[None]) -> None:
    """A shared read's outcome, whatever ended its task, retrieved so that none is left
    unreported when every waiter has gone."""
    if not done.done():
        done.set_exception(BackplaneUnavailable("history read cancelled"))
    done.exception()


#: Sessions subscribed to more than one of the channels being written together, each with
#: what it is to get of them (messages, and those joined), for one write at the end.
Shared = dict[Session, list[tuple[Sequence[Outbound], bytes]]]


def _deliver(
    members: Iterable[Session],
    batch: Sequence[Outbound],
    frame: bytes,
    shared: Shared | None = None,
) -> int:
    """Hand ``frame`` (``batch`` joined) to every member, or keep it in ``shared`` for those
    there; return the direct writes made.

    The loop every delivery goes through, so it does as little as it can: one attribute and
    one call for a client that can take the frame straight away.
    """
    writes = 0
    remaining = iter(members) if shared is None else _unshared(members, batch, frame, shared)
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


def _unshared(
    members: Iterable[Session], batch: Sequence[Outbound], frame: bytes, shared: Shared
) -> Iterator[Session]:
    """The members not in ``shared``; those in it get ``batch`` kept for their one write."""
    for session in members:
        later = shared.get(session)
        if later is None:
            yield session
        else:
            later.append((batch, frame))


class Hub:
    def __init__(
        self,
        make_backplane: Callable[[OnMessage], Backplane],
        stats: Stats,
        telemetry: Telemetry | None = None,
        *,
        coalescing: Coalescing,
        max_batch_bytes: int = 65536,
        read_limit: ReadLimit,
        max_envelope_bytes: int,
        backlog: Backlog,
        deltas: tuple[str, ...] = (),
        delta_max_bytes: int = 65536,
    ) -> None:
        self.stats = stats
        #: Patterns of the history channels whose subscribers may take deltas, and the
        #: largest text a delta is made of or against.
        self.delta_patterns = deltas
        self.delta_max_bytes = delta_max_bytes
        self._backlog = backlog
        self._drain: asyncio.Handle | None = None
        self._shed_log = Throttle()
        self.max_envelope_bytes = max_envelope_bytes
        self.read_limit = read_limit
        self._reads = asyncio.Semaphore(_READS_AT_ONCE)
        self.telemetry = telemetry
        self.coalescing = coalescing
        #: Channels to write on the loop's next iteration, together.
        self._due: list[_Channel] = []
        self._writing: asyncio.Handle | None = None
        self.max_batch_bytes = max_batch_bytes
        self.backplane = make_backplane(self.dispatch)
        self.backplane.on_resume = self._resume
        self._channels: dict[str, _Channel] = {}
        self._malformed_log = Throttle()
        self._unnumbered_log = Throttle()
        #: The replica's own channels (no client can subscribe there): what arrives on them
        #: goes to their listener, not to fan-out.
        self.listeners: dict[str, Callable[[bytes], None]] = {}
        #: Told of each session that joins or leaves a channel (presence).
        self.on_joined: Callable[[Session, str], None] | None = None
        self.on_left: Callable[[Session, str], None] | None = None

    def listen(self, channel: str, listener: Callable[[bytes], None]) -> None:
        """Hand what arrives on ``channel`` to ``listener``, from the backplane's first
        connection on (call before the backplane starts)."""
        self.listeners[channel] = listener
        self.backplane.keep(channel)

    @property
    def channels(self) -> int:
        return len(self._channels)

    def subscribers(self, channel: str) -> int:
        local = self._channels.get(channel)
        if local is None:
            return 0
        return len(local.members) + (len(local.deltas.synced) if local.deltas else 0)

    def takes_deltas(self, session: Session, channel: str) -> bool:
        """Whether ``session``'s subscription to ``channel`` takes deltas."""
        local = self._channels.get(channel)
        return local is not None and local.wants_deltas(session)

    def dispatch(self, channel: str, payload: bytes) -> None:
        """Queue one envelope for the local subscribers of ``channel``. Never blocks.

        It waits in the backlog until the next loop iteration, when it is fanned out with
        every other channel's, in turns (see :mod:`gateway.backlog`).
        """
        self.stats.messages_received += 1
        local = self._channels.get(channel)
        if local is None or not local.active:
            # Only here, off the fan-out path: the replica's own channels have no subscribers.
            listener = self.listeners.get(channel) if local is None else None
            if listener is not None:
                listener(payload)
            return
        backlog = self._backlog
        dropped = backlog.dropped
        backlog.push(channel, payload)
        if backlog.dropped != dropped:
            self.stats.shed += backlog.dropped - dropped
            self._log_shed()
        if self._drain is None:
            self._drain = asyncio.get_running_loop().call_soon(self._fan_out_backlog)

    def _fan_out_backlog(self) -> None:
        """Fan out what the backlog holds, channel after channel, for a slice of time at
        most: then the clients get their turn, and the backplane's reader."""
        self._drain = None
        backlog = self._backlog
        deadline = time.perf_counter() + _FAN_OUT_SLICE
        while backlog:
            channel, payload = backlog.pop()
            self._process(channel, payload)
            if time.perf_counter() >= deadline:
                break
        if backlog:
            self._drain = asyncio.get_running_loop().call_soon(self._fan_out_backlog)

    def _catch_up(self, local: _Channel) -> None:
        """Fan out, out of turn, what the backlog holds for ``local``: it arrived before
        whatever happens next on the channel."""
        for payload in self._backlog.take(local.name):
            self._process(local.name, payload)

    def _process(self, channel: str, payload: bytes) -> None:
        local = self._channels.get(channel)
        if local is None or not local.active:
            return
        envelope = self._decode(channel, payload)
        if envelope is None:
            return
        if local.cursor is None or envelope.event is not None:  # events are never numbered
            self._accept(local, envelope)
        elif local.held is not None:
            local.held.append(envelope)  # a gap is being filled: these come after it
        else:
            self._sequence(local, envelope, fill_gaps=True)

    def _decode(self, channel: str, payload: bytes) -> Envelope | None:
        try:
            return decode_envelope(payload, channel, self.max_envelope_bytes)
        except MalformedEnvelope as exc:
            self.stats.malformed[exc.reason] += 1
            self._log_malformed(channel, exc)
            return None

    def _accept(self, local: _Channel, envelope: Envelope) -> Outbound:
        """Add a message to the channel's next write, and schedule that write."""
        item = message(envelope)
        local.batch.append(item)
        local.batch_bytes += len(item)
        if local.deltas is not None:  # once for all of them, whoever they are
            local.deltas.accept(envelope, len(local.batch) - 1)
        telemetry = self.telemetry
        if telemetry is not None and telemetry.tracer is not None:
            local.received.append((envelope, time.time_ns()))
        if local.batch_bytes >= self.max_batch_bytes or not self.coalescing.enabled:
            self._write(local)
            return item
        loop = asyncio.get_running_loop()
        now = loop.time()
        window = self.coalescing.window
        local.gap = next_gap(local.gap, now - local.arrived, window)
        local.arrived = now
        if local.due:
            return item
        if gathered(len(local.batch), local.gap, window):
            if local.flush is not None:
                local.flush.cancel()
            self._make_due(local)
        elif local.flush is None:
            delay = local.last_write + window - now
            if delay > 0:
                local.flush = loop.call_later(delay, self._make_due, local)
            else:
                self._make_due(local)
        return item

    def _make_due(self, local: _Channel) -> None:
        """Write the channel's messages on the loop's next iteration, with the others due."""
        local.flush = None
        if not local.due:
            local.due = True
            self._due.append(local)
            if self._writing is None:
                self._writing = asyncio.get_running_loop().call_soon(self._write_due)

    def _write_due(self) -> None:
        """Write every channel due, a client of several of them getting one write of all."""
        self._writing = None
        due, self._due = self._due, []
        for local in due:
            local.due = False
        if len(due) == 1:
            self._write(due[0])
            return
        # iter(): Counter.update counts a mapping's values, and members map to None.
        counts: Counter[Session] = Counter()
        for local in due:
            if local.batch:
                counts.update(iter(local.members))
                if local.deltas is not None:
                    counts.update(iter(local.deltas.synced))
        shared: Shared = {session: [] for session, n in counts.items() if n > 1}
        for local in due:
            self._write(local, shared or None)
        for session, parts in shared.items():
            if len(parts) == 1:
                session.deliver(*parts[0])
            elif parts:
                session.deliver(
                    [item for items, _ in parts for item in items],
                    b"".join([frame for _, frame in parts]),
                )

    def _sequence(self, local: _Channel, envelope: Envelope, *, fill_gaps: bool) -> None:
        """Deliver a history channel's message once and in order; on a gap, read the missing
        messages from the stream first (or, after such a read, count them lost)."""
        cursor = local.cursor
        assert cursor is not None
        offset, epoch = envelope.offset, envelope.epoch
        if offset is None or epoch is None:  # a publisher that does not number it
            self.stats.history["unnumbered"] += 1
            if self._unnumbered_log.ready():
                log.warning(
                    "channel %s keeps history but a publisher sent it an unnumbered message "
                    "(a plain PUBLISH, not the append script): delivered, but no resume can "
                    "replay it; %d so far",
                    local.name,
                    self.stats.history["unnumbered"],
                )
            self._accept(local, envelope)
            return
        verdict = cursor.check(epoch, offset)
        if verdict is Verdict.DUPLICATE:
            self.stats.history["duplicate"] += 1
            return
        if verdict is Verdict.GAP:
            if fill_gaps:
                local.held = [envelope]
                self._fill(local)
                return
            missed = offset - 1 - (cursor.offset or 0 if epoch == cursor.epoch else 0)
            self.stats.history["lost"] += missed
            log.warning(
                "channel %s: %d messages before offset %d are no longer in its history",
                local.name,
                missed,
                offset,
            )
        cursor.advance(epoch, offset)
        item = self._accept(local, envelope)
        if local.state:
            local.newest = (epoch, item)

    def _fill(self, local: _Channel) -> None:
        if local.fetch is None:
            local.fetch = asyncio.create_task(self._read_missing(local), name=f"fill {local.name}")

    async def _read_missing(self, local: _Channel) -> None:
        """Read what the channel has not delivered from its stream, deliver it, then what was
        held meanwhile. A read that keeps failing is given up after a few tries, so a
        history that cannot be read never stops the live messages for long."""
        cursor = local.cursor
        assert cursor is not None
        page: Page[bytes] = Page(None, 0)
        for attempt in range(_FILL_ATTEMPTS):
            after = cursor.after(cursor.epoch)
            starts = [start for epoch, start in local.catching.values() if epoch == cursor.epoch]
            if cursor.offset is None and starts:
                after = min(starts)
            try:
                async with self._reads:
                    page = await self.backplane.history(local.name, after, self.read_limit)
                    epoch = page.epoch if page.epoch is not None else EMPTY_EPOCH
                    if epoch != cursor.epoch and cursor.epoch is not None and after:
                        # The history restarted meanwhile (Redis lost it, a failover lost
                        # the last writes): everything of the new epoch is missing.
                        page = await self.backplane.history(local.name, 0, self.read_limit)
                break
            except BackplaneUnavailable as exc:
                if attempt + 1 == _FILL_ATTEMPTS:
                    log.error("channel %s: gave up reading its history: %s", local.name, exc)
                    break
                delay = full_jitter(attempt, 0.1, 2.0)
                log.info(
                    "channel %s: cannot read history (%s); retry in %.2fs", local.name, exc, delay
                )
                await asyncio.sleep(delay)
        local.fetch = None
        held, local.held = local.held or [], None
        if self._channels.get(local.name) is not local:
            return  # everybody left meanwhile
        self.stats.history["filled"] += len(page.entries)
        for _, payload in page.entries:
            envelope = self._decode(local.name, payload)
            if envelope is not None:
                self._sequence(local, envelope, fill_gaps=False)
        for envelope in held:
            self._sequence(local, envelope, fill_gaps=False)

    def _resume(self) -> None:
        """The backplane is back from an outage: fill every history channel from its stream."""
        for local in self._channels.values():
            if local.cursor is not None and local.active and local.held is None:
                local.held = []
                self._fill(local)

    def _write(self, local: _Channel, shared: Shared | None = None) -> None:
        """Hand the channel's waiting messages to every subscriber, one buffer for all (those
        in ``shared`` get theirs later, with other channels')."""
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
        deltas = local.deltas
        variants = deltas.take(len(batch)) if deltas is not None else None
        with scope:
            writes = _deliver(members, batch, frame, shared)
            if deltas is not None and deltas.synced:
                assert variants is not None
                for group, items, joined in deltas.groups(batch, variants, frame):
                    writes += _deliver(group, items, joined, shared)
            if local.waiting:
                # Not live yet: whoever takes deltas keeps the chain's messages as full texts.
                fulls = full_texts(batch, variants) if variants is not None else batch
                for session, kept in local.waiting.items():
                    kept.extend(fulls if local.wants_deltas(session) else batch)
                if local.latest_read is not None:
                    local.latest_read.kept.extend(batch)
            if local.catching:
                self._deliver_catching(local, batch, variants)
        self.stats.writes += writes
        self.stats.fanout += (len(members) + (len(deltas.synced) if deltas else 0)) * len(batch)
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

    @staticmethod
    def _deliver_catching(
        local: _Channel, batch: list[Outbound], variants: list[Variant | None] | None
    ) -> None:
        """Subscribers that resumed ahead of the channel get only what follows their start
        (those that take deltas, the chain's first message as its full text)."""
        cursor = local.cursor
        for session, (epoch, start) in list(local.catching.items()):
            same_epoch = cursor is not None and cursor.epoch == epoch
            wanted = [
                index
                for index, item in enumerate(batch)
                if not same_epoch or item.offset is None or item.offset > start
            ]
            items = [batch[index] for index in wanted]
            deltas = local.deltas
            takes_deltas = deltas is not None and session in deltas.wanted
            if takes_deltas and variants is not None:
                items = texts(items, [variants[index] for index in wanted], holding=False)
            outbox = session.outbox
            drops = outbox.dropped if outbox is not None else 0
            if items:
                session.deliver(items, b"".join([item.frame for item in items]))
            if not same_epoch or (cursor is not None and (cursor.offset or 0) >= start):
                del local.catching[session]
                if takes_deltas:
                    assert deltas is not None
                    deltas.admit(session, items, drops)
                else:
                    local.admit(session)

    def _log_shed(self) -> None:
        if self._shed_log.ready():
            log.warning(
                "cannot fan out as fast as the backplane delivers: shed the oldest messages "
                "of the busiest channels (%d so far; backlog %d bytes)",
                self.stats.shed,
                self._backlog.bytes,
            )

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

    def allows_delta(self, channel: str) -> bool:
        return self.backplane.history_policy.applies(channel) and any(
            fnmatchcase(channel, pattern) for pattern in self.delta_patterns
        )

    async def subscribe(
        self,
        session: Session,
        channel: str,
        since: tuple[int, str] | None = None,
        latest: bool | None = None,
        delta: bool = False,
    ) -> Joined | None:
        """:meth:`_subscribe`, then tell :attr:`on_joined` of a session new on the channel.
        With ``delta`` (on a channel that allows it), its live messages come as deltas."""
        already = channel in session.channels
        joined = await self._subscribe(session, channel, since, latest, delta)
        if not already and channel in session.channels and self.on_joined is not None:
            self.on_joined(session, channel)
        return joined

    async def _subscribe(
        self,
        session: Session,
        channel: str,
        since: tuple[int, str] | None = None,
        latest: bool | None = None,
        delta: bool = False,
    ) -> Joined | None:
        """Add ``session`` to ``channel``; return once messages published from now on reach it.

        On a history channel, return where the session starts and the messages it missed
        since ``since`` (offset, epoch), or, when it wants the ``latest`` (by default on a
        state channel), only the channel's newest message; the caller sends them right after
        its reply, before any live message. Raises :class:`BackplaneUnavailable` (and leaves
        the session unsubscribed) when the backplane cannot confirm the subscription or read
        the history.
        """
        if channel in session.channels:
            return None
        local = self._channels.get(channel)
        if local is None:
            policy = self.backplane.history_policy
            local = self._channels[channel] = _Channel(
                channel, policy.applies(channel), policy.is_state(channel)
            )
            local.pending = asyncio.create_task(
                self.backplane.subscribe(channel), name=f"subscribe {channel}"
            )
            local.pending.add_done_callback(lambda task: self._settled(channel, local, task))
        session.channels.add(channel)
        if local.pending is not None:
            local.joining.add(session)
            try:
                await asyncio.shield(local.pending)
            except BackplaneUnavailable:
                session.channels.discard(channel)
                raise
            if session not in local.joining:
                return None  # it left while waiting
            local.joining.discard(session)
        if local.cursor is None:
            # What arrived before this subscription is not for it.
            self._catch_up(local)
            self._write(local)
            local.members[session] = None
            return None
        if delta and self.allows_delta(channel):
            if local.deltas is None:
                local.deltas = Deltas(self.delta_max_bytes)
            local.deltas.wanted[session] = None
        if latest is None:
            latest = self.backplane.history_policy.is_state(channel)
        return await self._join_history(session, local, since, latest)

    async def _join_history(
        self, session: Session, local: _Channel, since: tuple[int, str] | None, latest_only: bool
    ) -> Joined | None:
        self._catch_up(local)
        self._write(local)
        if latest_only and (joined := self._join_from_memory(session, local, since)):
            return joined
        # Joining a read in flight, it keeps what the read has seen delivered since it started
        # (as ordinary frames: one that takes deltas reads for itself, keeping texts).
        in_flight = local.latest_read if latest_only and not local.wants_deltas(session) else None
        kept: list[Outbound] = list(in_flight.kept) if in_flight is not None else []
        local.waiting[session] = kept
        if latest_only:  # the newest entry, whatever the position: one message
            after, messages = 0, 1
        elif since is not None:
            after, messages = since[0], self.read_limit.messages
        else:  # only the epoch and top
            after, messages = _TOP, 1
        try:
            if in_flight is not None:
                await asyncio.shield(in_flight.done)
                read = in_flight
            else:
                read = await self._read_shared(local, after, messages)
        except BackplaneUnavailable:
            local.waiting.pop(session, None)
            await self.unsubscribe(session, local.name)
            raise
        self._catch_up(local)  # what arrived during the read is in `kept` too
        self._write(local)
        local.waiting.pop(session, None)
        if local.name not in session.channels:
            return None  # it left while reading
        page = read.page
        if latest_only:
            recovery = latest(page, since)
        else:
            if after > read.after:
                page = Page(page.epoch, page.top, [e for e in page.entries if e[0] > after])
            recovery = recover(page, since)
        cursor = local.cursor
        assert cursor is not None
        if cursor.epoch is None:
            cursor.epoch = recovery.epoch
        # The page's messages are shared with every client resuming from it; this list of
        # references is the client's own.
        replay = [item for _, item in recovery.replay if item is not None]
        start = recovery.position
        replay.extend(item for item in kept if item.offset is None or item.offset > start)
        if cursor.epoch == recovery.epoch and (cursor.offset or 0) >= start:
            local.admit(session)
        else:
            local.catching[session] = (recovery.epoch, start)
        self.stats.history["latest" if latest_only else "replayed"] += len(recovery.replay)
        follows = latest_only and any(item is not None for _, item in recovery.replay)
        return Joined(recovery, replay, follows)

    @staticmethod
    def _hold_newest(local: _Channel, page: Page[Outbound | None]) -> None:
        """Keep the newest message a read brought, if it is newer than what the state
        channel knows: later subscribers have it from memory, without reading again."""
        if not local.state or not page.entries or page.epoch is None:
            return
        offset, item = page.entries[-1]
        if item is None or offset != page.top:
            return
        known = local.newest
        if known is None or known[0] != page.epoch or (known[1].offset or 0) < offset:
            local.newest = (page.epoch, item)

    def _join_from_memory(
        self, session: Session, local: _Channel, since: tuple[int, str] | None
    ) -> Joined | None:
        """A state channel's subscriber gets the newest message the replica knows, kept in
        memory: a thousand subscribers arriving together cost no read of Redis. None when the
        channel has no such message (none yet, or a gap being filled)."""
        cursor, newest = local.cursor, local.newest
        if cursor is None or newest is None or local.held is not None:
            return None
        epoch, item = newest
        start = item.offset
        assert start is not None
        page: Page[Outbound | None] = Page(epoch, start, [(start, item)])
        recovery = latest(page, since)
        replay = [item for _, item in recovery.replay if item is not None]
        if cursor.epoch == epoch and (cursor.offset or 0) >= start:
            local.admit(session)
        else:  # read, not yet live: what arrives live up to it is not for this subscriber
            local.catching[session] = (epoch, start)
        self.stats.history["latest"] += len(replay)
        return Joined(recovery, replay, bool(replay))

    async def _read_shared(self, local: _Channel, after: int, messages: int) -> _Read:
        """Read the channel's history once for every subscriber that asks before the read
        starts (a reconnect storm: the clients of a lost replica arriving together), from
        the lowest position asked and as many messages as the most demanding one wants (the
        newest are read first: one who wants only the latest finds it in any read); each
        takes the part after its own.

        The read starts on a later loop iteration (after a free read slot, see
        ``_READS_AT_ONCE``), after every such subscriber began keeping the live messages, so
        none falls between the read and what it keeps.
        """
        read = local.next_read
        if read is None:
            read = local.next_read = _Read(after, messages)
            task = asyncio.create_task(self._read(local, read), name=f"read {local.name}")
            task.add_done_callback(lambda _: _settle(read.done))
        else:
            read.after = min(read.after, after)
            read.messages = max(read.messages, messages)
        await asyncio.shield(read.done)
        return read

    async def _read(self, local: _Channel, read: _Read) -> None:
        try:
            async with self._reads:
                if local.next_read is read:
                    local.next_read = None  # who comes now needs a read that starts after it
                if read.after == 0:  # it brings the newest message, whatever else
                    local.latest_read = read
                limit = ReadLimit(read.messages, self.read_limit.bytes)
                raw = await self.backplane.history(local.name, read.after, limit)
            read.page = await self._decode_page(local, raw)
            self._hold_newest(local, read.page)
        except Exception as exc:  # the readers hear of it (unavailable, or a bug)
            read.done.set_exception(exc)
            return
        finally:
            if local.latest_read is read:
                local.latest_read = None
        read.done.set_result(None)

    async def _decode_page(self, local: _Channel, raw: Page[bytes]) -> Page[Outbound | None]:
        """A page's entries as message frames, each decoded and encoded once, and once for
        every read that brings the same offset while a client still has it to receive.

        A page can hold megabytes: the other clients get their turn every few milliseconds.
        """
        decoded = local.decoded
        assert decoded is not None
        turns = Turns(_FAN_OUT_SLICE)
        entries: list[tuple[int, Outbound | None]] = []
        for offset, payload in raw.entries:
            await turns.take()
            key = (raw.epoch, offset)
            item = decoded.get(key)
            if item is None:
                envelope = self._decode(local.name, payload)
                if envelope is not None:
                    item = decoded[key] = message(envelope)
            entries.append((offset, item))
        return Page(raw.epoch, raw.top, entries)

    async def unsubscribe(self, session: Session, channel: str) -> bool:
        """Remove ``session`` from ``channel``; False if it was not subscribed."""
        if channel not in session.channels:
            return False
        session.channels.discard(channel)
        if self.on_left is not None:
            self.on_left(session, channel)
        local = self._channels.get(channel)
        if local is not None:
            local.members.pop(session, None)
            if local.deltas is not None:
                local.deltas.leave(session)
                if not local.deltas.wanted:
                    local.deltas = None  # the chain's text and any variants with it
            local.joining.discard(session)
            local.waiting.pop(session, None)
            local.catching.pop(session, None)
            if not local.active and not local.joining:
                if local.flush is not None:
                    local.flush.cancel()
                if local.fetch is not None:
                    local.fetch.cancel()
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

"""Presence on the replica: who of its clients is on the channels that keep it, their join and
leave frames, and the lease that lets the other replicas send their leaves if it dies.

Joins and leaves of a channel are gathered for ``window`` seconds, then written to the store
in one call. Each window the replica sends a channel at most one ``join`` and one ``leave``
frame, of at most :data:`EVENT_MEMBERS` members and :data:`EVENT_BYTES` bytes of them; the
rest wait for the next windows, in order. When more than :data:`STORM_MEMBERS` wait (or
entries of more than :data:`STORM_BYTES`), the frame lists what fits and says how many more
there are (``more``), and the others are announced by that count only: whoever needs every
name reads presence. So a storm (10,000 clients arriving, a dead replica's clients leaving)
costs each member of the room at most two frames of 4 KiB a window from each replica, never
a frame per client, while up to 1,000 joins or leaves (128 KiB of them) are still announced
one by one. A client that joins and leaves before its
join was announced is announced not at all.

The replica's lease in the store names every member it holds before the store lists it, and
until after the store no longer does: each flush records the members it writes first and
forgets those it removed last, so a replica killed at any moment leaves no member that its
survivors cannot find and send the leave of. Every sixth of ``presence_lease`` it extends
its lease and looks for replicas whose lease ran out: the one that claims a dead replica
removes its members from each channel and sends their leaves, once. Every third of
``presence_ttl`` it pushes its members' expiry forward, channel by channel under the same
lock as the flushes (so a renewal never writes a member back after its leave), leaving out
joins not yet written. After a Redis outage it writes all of its members again: presence is
rebuilt from the live sessions.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.backplane import Backplane, BackplaneUnavailable
from gateway.backplane.base import Member
from gateway.throttle import Throttle
from publisher.presence import PresencePolicy, member, member_parts

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

    from gateway.session import Session
    from gateway.stats import Stats

__all__ = ["EVENT_BYTES", "EVENT_MEMBERS", "STORM_BYTES", "STORM_MEMBERS", "Presence"]

log = logging.getLogger("gateway.presence")

#: Members one join or leave frame lists at most, and the bytes of their entries (at least
#: one entry: with the largest info, 1 KiB, and sub, 256 characters, an entry is under 2 KiB).
EVENT_MEMBERS = 100
EVENT_BYTES = 4096
#: Joins (or leaves) waiting to be announced on one channel, or bytes of their entries (32
#: frames' worth, 3.2 s of windows), beyond which they are announced by their count.
STORM_MEMBERS = 1000
STORM_BYTES = 32 * EVENT_BYTES


class _Entry(msgspec.Struct, omit_defaults=True):
    client: str
    user: str | None
    info: msgspec.Raw | None = None


class _EventData(msgspec.Struct, omit_defaults=True):
    members: msgspec.Raw
    more: int = 0


class _Event(msgspec.Struct):
    v: int
    channel: str
    data: _EventData
    mid: str
    ts: int
    event: str


class _Client(msgspec.Struct):
    client: str


_encode = msgspec.json.encode
_client_of = msgspec.json.Decoder(_Client)


def client_id(session: Session) -> str:
    return session.connection.id.hex


class _Announcements:
    """A channel's joins and leaves written and not yet announced, in order, by client."""

    __slots__ = ("join", "leave")

    def __init__(self) -> None:
        self.join: dict[str, bytes] = {}
        self.leave: dict[str, bytes] = {}

    def __bool__(self) -> bool:
        return bool(self.join or self.leave)


class _Pending:
    """A channel's joins and leaves not yet written."""

    __slots__ = ("joins", "leaves")

    def __init__(self) -> None:
        self.joins: dict[str, Member] = {}
        self.leaves: dict[str, None] = {}  # an insertion-ordered set


class Presence:
    def __init__(
        self,
        replica: str,
        backplane: Backplane,
        policy: PresencePolicy,
        stats: Stats,
        tracer: Tracer | None = None,
    ) -> None:
        self.replica = replica
        self.tracer = tracer
        self.backplane = backplane
        self.policy = policy
        self.stats = stats
        #: channel -> session -> its member, for the channels with presence only.
        self._members: dict[str, dict[Session, Member]] = {}
        #: Each session's member (the same on all its channels, info and all: an info near
        #: its 1 KiB limit held once, not once per channel) and on how many channels it is.
        self._entries: dict[Session, list[Any]] = {}
        self._pending: dict[str, _Pending] = {}
        self._announcements: dict[str, _Announcements] = {}
        self._flush: asyncio.TimerHandle | None = None
        self._writing = asyncio.Lock()  # one flush at a time, in order
        self._rebuild = False
        self._log = Throttle()

    # Sessions joining and leaving (called by the hub)

    def joined(self, session: Session, channel: str) -> None:
        if not self.policy.applies(channel):
            return
        held = self._members.setdefault(channel, {})
        if session in held:
            return
        shared = self._entries.get(session)
        if shared is None:
            client = client_id(session)
            info = msgspec.Raw(session.info) if session.info is not None else None
            entry = _encode(_Entry(client, session.subject, info))
            shared = self._entries[session] = [(client, session.subject, entry), 0]
        shared[1] += 1
        member_of: Member = shared[0]
        held[session] = member_of
        pending = self._pending_of(channel)
        if member_of[0] in pending.leaves:
            # It left and came back within the window: the store and the lease still have
            # it, and nobody was told it went. Writing the join, then the leave, would
            # remove a member that is here.
            del pending.leaves[member_of[0]]
            return
        pending.joins[member_of[0]] = member_of
        self._schedule()

    def left(self, session: Session, channel: str) -> None:
        held = self._members.get(channel)
        if held is None or session not in held:
            return
        client = held.pop(session)[0]
        if not held:
            del self._members[channel]
        shared = self._entries[session]
        shared[1] -= 1
        if not shared[1]:
            del self._entries[session]
        pending = self._pending_of(channel)
        if pending.joins.pop(client, None) is None:  # a join still pending: as if never
            pending.leaves[client] = None
        self._schedule()

    def _pending_of(self, channel: str) -> _Pending:
        pending = self._pending.get(channel)
        if pending is None:
            pending = self._pending[channel] = _Pending()
        return pending

    def _schedule(self) -> None:
        if self._flush is None:
            loop = asyncio.get_running_loop()
            self._flush = loop.call_later(self.policy.window, self._start_flush)

    def _start_flush(self) -> None:
        self._flush = None
        task = asyncio.create_task(self.flush(), name="presence flush")
        task.add_done_callback(_log_failure)

    async def flush(self) -> None:
        """Write what is pending and announce what is due. What cannot be written (Redis is
        down) is dropped, channel by channel, and the next renewal writes every member still
        here again; the leaves of the meantime are lost with the outage's messages, and
        their members expire after GATEWAY_PRESENCE_TTL."""
        async with self._writing:
            pending, self._pending = self._pending, {}
            store = self.backplane.presence
            ttl_ms = int(self.policy.ttl * 1000)
            # The lease first: whatever the store lists, a survivor can find and remove.
            added = [
                member(client, channel)
                for channel, changes in pending.items()
                for client in changes.joins
            ]
            try:
                if added:
                    await self._record(added, [])
            except BackplaneUnavailable as exc:
                self._rebuild = True
                self._warn("presence not written: %s", exc)
                pending = {}
            removed: list[str] = []
            for channel, changes in pending.items():
                try:
                    if changes.joins:
                        joins = list(changes.joins.values())
                        await store.join(channel, joins, ttl_ms)
                        self.stats.presence["join"] += len(joins)
                        self._queue(channel, "join", [entry for _, _, entry in joins])
                    if changes.leaves:
                        clients = list(changes.leaves)
                        left = await store.leave(channel, clients)
                        removed += (member(client, channel) for client in clients)
                        self.stats.presence["leave"] += len(left)
                        self._queue(channel, "leave", left)
                except BackplaneUnavailable as exc:
                    self._rebuild = True
                    self._warn("presence of %s not written: %s", channel, exc)
            # ... and last: a member leaves the lease once the store has let it go.
            if removed:
                try:
                    await self._record([], removed)
                except BackplaneUnavailable as exc:  # a dead replica's reaper finds none
                    self._warn("presence lease not updated: %s", exc)
            await self._announce_due()

    async def _record(self, added: list[str], removed: list[str]) -> None:
        """Record members in (or out of) the replica's lease, and extend it."""
        lease_ms = int(self.policy.lease * 1000)
        await self.backplane.presence.renew_lease(self.replica, lease_ms, added, removed)

    def _queue(self, channel: str, event: str, entries: list[bytes]) -> None:
        """Wait ``entries`` for their announcement (on channels with join/leave)."""
        if not entries or not self.policy.announces(channel):
            return
        waiting = self._announcements.get(channel)
        if waiting is None:
            waiting = self._announcements[channel] = _Announcements()
        for entry in entries:
            client = _client_of.decode(entry).client
            if event == "leave" and waiting.join.pop(client, None) is not None:
                continue  # it comes and goes before anyone was told it came
            getattr(waiting, event)[client] = entry

    async def _announce_due(self) -> None:
        """Send each channel its frames of this window; come back next window for the rest."""
        store = self.backplane.presence
        for channel, waiting in list(self._announcements.items()):
            for event in ("join", "leave"):
                queued: dict[str, bytes] = getattr(waiting, event)
                if not queued:
                    continue
                listed: list[bytes] = []
                size = 0
                for client in list(itertools.islice(queued, EVENT_MEMBERS)):
                    entry = queued[client]
                    if listed and size + len(entry) > EVENT_BYTES:
                        break
                    listed.append(queued.pop(client))
                    size += len(entry) + 1
                more = 0
                if len(queued) >= STORM_MEMBERS or _size(queued) > STORM_BYTES:
                    more = len(queued)
                    queued.clear()
                data = _EventData(msgspec.Raw(b"[" + b",".join(listed) + b"]"), more)
                ts = time.time_ns() // 1_000_000
                payload = _encode(_Event(1, channel, data, uuid.uuid4().hex, ts, event))
                try:
                    await store.event(channel, payload)
                except BackplaneUnavailable as exc:
                    self._warn("%s frame for %s not sent: %s", event, channel, exc)
                    continue
                self.stats.presence_events[event] += 1
            if not waiting:
                self._announcements.pop(channel, None)
        if self._announcements:
            self._schedule()

    # Reading (the presence and presence_stats ops)

    async def page(self, channel: str, cursor: str, limit: int) -> tuple[str, bytes]:
        """About ``limit`` members from ``cursor``: the next cursor ('0' at the end) and the
        members as a JSON array. Redis decides the exact count (HSCAN): nothing is cut from
        a page, or the cursor would skip it."""
        following, entries = await self.backplane.presence.page(channel, cursor, limit)
        return following, b"[" + b",".join(entries) + b"]"

    async def stats_of(self, channel: str) -> tuple[int, int]:
        return await self.backplane.presence.stats(channel)

    # The lease, expiry, dead replicas

    def resumed(self) -> None:
        """The backplane is back after an outage: write every member again at once."""
        self._rebuild = True

    async def serve(self) -> None:
        """Renew the lease, the members' expiry, and reap dead replicas, until cancelled.

        Every sixth of the lease: a replica killed just after a renewal has its lease run out
        a lease later, and a survivor sees it within a sixth more, inside the documented
        lease and a third."""
        loop = asyncio.get_running_loop()
        touched = loop.time()
        self._rebuild = True  # the first renewal records every member
        while True:
            try:
                if self._rebuild or loop.time() - touched >= self.policy.ttl / 3:
                    rebuild, self._rebuild = self._rebuild, False
                    await self._touch_all(record=rebuild)
                    touched = loop.time()
                await self._record([], [])
                await self._reap()
            except BackplaneUnavailable as exc:
                self._rebuild = True
                self._warn("presence lease not renewed: %s", exc)
            await asyncio.sleep(self.policy.lease / 6)

    async def _touch_all(self, *, record: bool) -> None:
        """Push every member's expiry forward (and write it again if Redis lost it; with
        ``record``, write it and record it in the lease whatever Redis has).

        Channel by channel under the flushes' lock, from what the replica holds at that
        moment less the joins not yet written (the next flush writes them): a member that
        leaves meanwhile has its leave written after this, never before."""
        store = self.backplane.presence
        ttl_ms = int(self.policy.ttl * 1000)
        for channel in list(self._members):
            async with self._writing:
                held = self._members.get(channel)
                if not held:
                    continue
                pending = self._pending.get(channel)
                unwritten = pending.joins if pending is not None else {}
                entries = [entry for entry in held.values() if entry[0] not in unwritten]
                for start in range(0, len(entries), 500):
                    batch = entries[start : start + 500]
                    if record:
                        await self._record([member(client, channel) for client, _, _ in batch], [])
                        await store.join(channel, batch, ttl_ms)
                    elif await store.touch(channel, [client for client, _, _ in batch], ttl_ms):
                        # Redis lost some (a restart; or a survivor reaped this replica while
                        # it stalled, its lease with it): written and recorded again.
                        await self._record([member(client, channel) for client, _, _ in batch], [])
                        await store.join(channel, batch, ttl_ms)

    async def _reap(self) -> None:
        for replica, members in await self.backplane.presence.claim_dead():
            span = self.tracer.start_span("presence reap") if self.tracer is not None else None
            by_channel: dict[str, list[str]] = collections.defaultdict(list)
            for raw in members:
                client, channel = member_parts(raw)
                by_channel[channel].append(client)
            left = 0
            try:
                for channel, clients in by_channel.items():
                    removed = await self.backplane.presence.leave(channel, clients)
                    left += len(removed)
                    self.stats.presence["reaped"] += len(removed)
                    self._queue(channel, "leave", removed)
            finally:
                if span is not None:
                    span.set_attribute("wsgateway.presence.replica", replica)
                    span.set_attribute("wsgateway.presence.members", left)
                    span.set_attribute("wsgateway.presence.channels", len(by_channel))
                    span.end()
            async with self._writing:  # not beside a flush's announcements
                await self._announce_due()
            log.warning(
                "replica %s lost its lease: sent the leaves of its %d members on %d channels",
                replica,
                left,
                len(by_channel),
            )

    async def stop(self) -> None:
        """The replica stops: its clients' leaves were written as they left; end the lease."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        await self.flush()
        try:
            await self.backplane.presence.end_lease(self.replica)
        except BackplaneUnavailable as exc:
            log.warning("presence lease not ended: %s", exc)

    def _warn(self, text: str, *args: object) -> None:
        if self._log.ready():
            log.warning(text + "; %d more since the last line", *args, self._log.take_suppressed())


def _size(queued: dict[str, bytes]) -> int:
    return sum(len(entry) for entry in queued.values())


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("presence flush failed", exc_info=task.exception())

"""Presence on the replica: who of its clients is on the channels that keep it, their join and
leave frames, and the lease that lets the other replicas send their leaves if it dies.

Joins and leaves of a channel are gathered for ``window`` seconds, then written to the store
in one call. Each window the replica sends a channel at most one ``join`` and one ``leave``
frame, of at most :data:`EVENT_MEMBERS` members; the rest wait for the next windows, in
order. When more than :data:`STORM_MEMBERS` wait, the frame lists :data:`EVENT_MEMBERS` of
them and says how many more there are (``more``), and the others are announced by that count
only: whoever needs every name reads presence. So a storm (10,000 clients arriving, a dead
replica's clients leaving) costs each member of the room at most two frames a window, never a
frame per client, and never more bytes than it can read; up to 1,000 joins or leaves are
still announced one by one. A client that joins and leaves before its join was announced is
announced not at all.

Every third of ``presence_ttl`` the replica pushes its members' expiry forward, and every
third of ``presence_lease`` it renews its lease (recording the members it gained and lost) and
looks for replicas whose lease ran out: the one that claims a dead replica removes its
members from each channel and sends their leaves, once. After a Redis outage it writes all of
its members again: presence is rebuilt from the live sessions.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
import uuid
from typing import TYPE_CHECKING

import msgspec

from gateway.backplane import Backplane, BackplaneUnavailable
from gateway.backplane.base import Member
from gateway.throttle import Throttle
from publisher.presence import PresencePolicy, member, member_parts

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

    from gateway.session import Session
    from gateway.stats import Stats

__all__ = ["EVENT_MEMBERS", "STORM_MEMBERS", "Presence"]

log = logging.getLogger("gateway.presence")

#: Members one join or leave frame lists at most.
EVENT_MEMBERS = 100
#: Joins (or leaves) waiting to be announced on one channel beyond which they are announced
#: by their count.
STORM_MEMBERS = 1000


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
        self.leaves: list[str] = []


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
        self._pending: dict[str, _Pending] = {}
        self._announcements: dict[str, _Announcements] = {}
        self._lease_added: list[str] = []
        self._lease_removed: list[str] = []
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
        client = client_id(session)
        info = msgspec.Raw(session.info) if session.info is not None else None
        entry: Member = (client, session.subject, _encode(_Entry(client, session.subject, info)))
        held[session] = entry
        self._pending_of(channel).joins[client] = entry
        self._lease_added.append(member(client, channel))
        self._schedule()

    def left(self, session: Session, channel: str) -> None:
        held = self._members.get(channel)
        if held is None or session not in held:
            return
        client = held.pop(session)[0]
        if not held:
            del self._members[channel]
        pending = self._pending_of(channel)
        if pending.joins.pop(client, None) is None:  # a join still pending: as if never
            pending.leaves.append(client)
        self._lease_removed.append(member(client, channel))
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
        """Write what is pending and announce what is due; what cannot be written (Redis is
        down) is dropped: the rebuild after the outage writes the members that are still
        here, and their leaves of the meantime are lost with the outage's messages."""
        async with self._writing:
            pending, self._pending = self._pending, {}
            store = self.backplane.presence
            ttl_ms = int(self.policy.ttl * 1000)
            for channel, changes in pending.items():
                try:
                    if changes.joins:
                        joins = list(changes.joins.values())
                        await store.join(channel, joins, ttl_ms)
                        self.stats.presence["join"] += len(joins)
                        self._queue(channel, "join", [entry for _, _, entry in joins])
                    if changes.leaves:
                        removed = await store.leave(channel, changes.leaves)
                        self.stats.presence["leave"] += len(removed)
                        self._queue(channel, "leave", removed)
                except BackplaneUnavailable as exc:
                    self._warn("presence of %s not written: %s", channel, exc)
            await self._announce_due()

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
                clients = list(itertools.islice(queued, EVENT_MEMBERS))
                listed = [queued.pop(client) for client in clients]
                more = 0
                if len(queued) >= STORM_MEMBERS:
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
        """Renew the lease, the members' expiry, and reap dead replicas, until cancelled."""
        loop = asyncio.get_running_loop()
        touched = loop.time()
        self._rebuild = True  # the first renewal records every member
        while True:
            try:
                if self._rebuild or loop.time() - touched >= self.policy.ttl / 3:
                    rebuild, self._rebuild = self._rebuild, False
                    await self._touch_all(record=rebuild)
                    touched = loop.time()
                await self._renew()
                await self._reap()
            except BackplaneUnavailable as exc:
                self._rebuild = True
                self._warn("presence lease not renewed: %s", exc)
            await asyncio.sleep(self.policy.lease / 3)

    async def _touch_all(self, *, record: bool) -> None:
        """Push every member's expiry forward (and write it again if Redis lost it)."""
        store = self.backplane.presence
        ttl_ms = int(self.policy.ttl * 1000)
        for channel, held in list(self._members.items()):
            entries = list(held.values())
            for start in range(0, len(entries), 500):
                batch = entries[start : start + 500]
                # Only the expiry, unless Redis lost some (a restart): then the entries too.
                if record or await store.touch(channel, [c for c, _, _ in batch], ttl_ms):
                    await store.join(channel, batch, ttl_ms)
            if record:
                self._lease_added.extend(member(client, channel) for client, _, _ in entries)

    async def _renew(self) -> None:
        added, self._lease_added = self._lease_added, []
        removed, self._lease_removed = self._lease_removed, []
        # On failure they are dropped: the rebuild after the outage records every member
        # still here, and a member recorded after it left is never announced (the store
        # answers a leave only for members it has).
        await self.backplane.presence.renew_lease(
            self.replica, int(self.policy.lease * 1000), added, removed
        )

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


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("presence flush failed", exc_info=task.exception())

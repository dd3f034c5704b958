"""The :class:`Backplane` interface that the hub talks to."""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from gateway.history import Page, ReadLimit
from gateway.throttle import Throttle
from publisher.history import HistoryPolicy

__all__ = [
    "Backplane",
    "BackplaneUnavailable",
    "ChannelNames",
    "Confirmations",
    "Member",
    "OnMessage",
    "PresenceStore",
    "Probe",
    "RedisOptions",
]

log = logging.getLogger("gateway.backplane")

#: Called with (channel without prefix, envelope bytes) for every message received. It must
#: not block: the backplane's reader goes straight back to reading when it returns.
OnMessage = Callable[[str, bytes], None]


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """What the ``redis`` and ``redis-cluster`` backplanes share (seconds unless told)."""

    prefix: str = "ws:"
    subscribe_timeout: float = 5.0
    reconnect_min: float = 0.1
    reconnect_max: float = 10.0
    probe_interval: float = 5.0  # on a cluster, also how often the slot map is re-read
    probe_timeout: float = 3.0
    connect_timeout: float = 5.0
    max_connections: int = 32  # command connections (per node on a cluster)


class ChannelNames:
    """Redis channel names: ``<prefix><channel>``, and back (None for anything else)."""

    __slots__ = ("_prefix", "prefix")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._prefix = prefix.encode()

    def key(self, channel: str) -> bytes:
        return (self.prefix + channel).encode()

    def channel(self, key: bytes) -> str | None:
        if not key.startswith(self._prefix):
            return None
        return key[len(self._prefix) :].decode("utf-8", "replace")


class Confirmations:
    """Who waits for Redis to confirm a (S)SUBSCRIBE of each channel, in the order asked.

    Redis confirms a channel's subscriptions in the order they were sent, so the first
    waiter of a channel is the one a confirmation answers. A channel has an entry only while
    someone waits for it: a replica that subscribes once to each of a million channel names
    keeps nothing for them once confirmed.
    """

    __slots__ = ("_waiting",)

    def __init__(self) -> None:
        self._waiting: dict[bytes, collections.deque[asyncio.Future[None]]] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def expect(self, key: bytes) -> asyncio.Future[None]:
        """A future set when Redis confirms ``key``'s subscription."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, collections.deque()).append(waiter)
        return waiter

    def confirm(self, key: bytes) -> None:
        waiters = self._waiting.get(key)
        if waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        if not waiters:
            self._waiting.pop(key, None)

    def forget(self, key: bytes, waiter: asyncio.Future[None]) -> None:
        """``waiter`` no longer waits (confirmed, timed out or failed; a failure nobody
        awaited, the connection lost before the SUBSCRIBE was sent, is retrieved here)."""
        if waiter.done() and not waiter.cancelled():
            waiter.exception()
        waiters = self._waiting.get(key)
        if waiters is not None:
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                del self._waiting[key]

    def fail(self, exc: Exception) -> None:
        """The connection is gone: every waiter gets ``exc``."""
        for waiters in self._waiting.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
        self._waiting.clear()


class Probe:
    """What comes back of a connection's probes (a publish to a channel that only this
    connection subscribes to), and how many other messages it delivered meanwhile."""

    __slots__ = ("_arrived", "received", "seen")

    def __init__(self) -> None:
        self.seen = 0  # the highest probe number back
        self.received = 0  # messages of any kind the connection delivered
        self._arrived = asyncio.Event()

    def arrived(self, data: bytes) -> None:
        with contextlib.suppress(ValueError):
            self.seen = max(self.seen, int(data))
        self._arrived.set()

    async def wait(self, number: int, timeout: float) -> None:
        """Return once probe ``number`` is back. Raise TimeoutError when for ``timeout``
        seconds neither it nor any other message came: the connection is silent. One that
        keeps delivering other messages is behind (a flood queued in Redis ahead of the
        probe), not silent, and replacing it would lose that flood and every other channel's
        messages with it: wait on."""
        while self.seen < number:
            before = self.received
            try:
                async with asyncio.timeout(timeout):
                    while self.seen < number:
                        self._arrived.clear()
                        await self._arrived.wait()
            except TimeoutError:
                if self.received == before:
                    raise


#: One member as the store keeps it: (client id, user or None, entry JSON).
Member = tuple[str, str | None, bytes]


class PresenceStore(abc.ABC):
    """Who is subscribed to the channels with presence, across replicas, and the leases that
    let survivors clean up after a replica that died (publisher.presence says how Redis
    keeps them). Every method raises :class:`BackplaneUnavailable` when the store is down."""

    @abc.abstractmethod
    async def join(self, channel: str, members: list[Member], ttl_ms: int) -> int:
        """Add ``members`` (or push their expiry ``ttl_ms`` forward); return how many were new."""

    @abc.abstractmethod
    async def touch(self, channel: str, clients: list[str], ttl_ms: int) -> int:
        """Push the expiry of ``clients`` forward; return how many the store did not have."""

    @abc.abstractmethod
    async def leave(self, channel: str, clients: list[str]) -> list[bytes]:
        """Remove ``clients``; return the entries of those that were there."""

    @abc.abstractmethod
    async def page(self, channel: str, cursor: str, count: int) -> tuple[str, list[bytes]]:
        """About ``count`` entries from ``cursor`` ('0' first); the next cursor, '0' at the end."""

    @abc.abstractmethod
    async def stats(self, channel: str) -> tuple[int, int]:
        """(clients, unique users) of ``channel``."""

    @abc.abstractmethod
    async def event(self, channel: str, payload: bytes) -> None:
        """Send a join/leave event envelope to ``channel``'s subscribers on every replica,
        outside its history."""

    @abc.abstractmethod
    async def renew_lease(
        self, replica: str, ttl_ms: int, added: list[str], removed: list[str]
    ) -> None:
        """Extend ``replica``'s lease and record the members it gained and lost."""

    @abc.abstractmethod
    async def claim_dead(self) -> list[tuple[str, list[bytes]]]:
        """Each replica whose lease ran out that this caller claimed (no other will), with the
        members it held; their records are gone from the store."""

    @abc.abstractmethod
    async def end_lease(self, replica: str) -> None:
        """``replica`` stops cleanly: it has sent its own leaves."""


class BackplaneUnavailable(Exception):
    """The backplane is down or did not answer in time; the request can be retried later."""


class Backplane(abc.ABC):
    #: Short name for logs and metrics: ``memory`` or ``redis``.
    name: str
    #: Connections re-established after a loss, and the total time spent disconnected.
    reconnects: int = 0
    outage_seconds: float = 0.0

    #: Called after the backplane comes back from an outage: what was published meanwhile
    #: never arrived, and the hub fills it in from the history channels' streams.
    on_resume: Callable[[], None] | None = None
    #: Where presence and replica leases live.
    presence: PresenceStore

    def __init__(self, on_message: OnMessage, history: HistoryPolicy | None = None) -> None:
        self.on_message = on_message
        #: Which channels keep history: publish() numbers and stores their messages.
        self.history_policy = history or HistoryPolicy()
        self._failures = Throttle()

    def deliver(self, channel: str, payload: bytes) -> None:
        """Hand a received message to ``on_message``; a failure there (a bug: bad input is
        handled inside) is logged at most once a second and never stops the reader."""
        try:
            self.on_message(channel, payload)
        except Exception:
            if self._failures.ready():
                log.exception(
                    "fan-out failed for channel %s; %d more failures since the last line",
                    channel,
                    self._failures.take_suppressed(),
                )

    @property
    @abc.abstractmethod
    def subscribed_channels(self) -> int:
        """How many channels the backplane receives for this replica."""

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """True while messages published now would reach this replica."""

    def node_states(self) -> dict[str, bool]:
        """Each Redis node connection the backplane holds: node -> connected."""
        return {}

    def unready_reason(self) -> str:
        """Why the replica is not ready while :attr:`connected` is false (for ``/readyz``)."""
        return f"{self.name} backplane disconnected"

    @abc.abstractmethod
    async def start(self) -> None:
        """Begin connecting. Returns without waiting for the connection to succeed."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect and stop every task of the backplane."""

    @abc.abstractmethod
    async def subscribe(self, channel: str) -> None:
        """Start receiving ``channel``; return once messages published from now on arrive.

        Raises :class:`BackplaneUnavailable` when that cannot be confirmed.
        """

    @abc.abstractmethod
    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving ``channel``. Never raises: a lost connection drops it anyway."""

    @abc.abstractmethod
    async def publish(self, channel: str, envelope: bytes) -> int:
        """Publish an encoded (version 1) envelope; return how many replicas received it.

        On a history channel the message is numbered and stored in the same step.
        Raises :class:`BackplaneUnavailable` when the backplane is down.
        """

    @abc.abstractmethod
    def keep(self, channel: str) -> None:
        """Receive ``channel`` from the first connection on, through every reconnection, for
        as long as the backplane runs (the replica's own channels: call before start())."""

    @abc.abstractmethod
    async def acknowledge(self, request_id: str, ack: bytes) -> None:
        """Push a control request's acknowledgement onto its list (publisher.control).

        Raises :class:`BackplaneUnavailable` when the backplane is down.
        """

    @abc.abstractmethod
    async def advertise(self, document: bytes, ttl_ms: int) -> bytes | None:
        """Write the replica's channel kinds where publishers read them (publisher.kinds),
        for ``ttl_ms``; return what was there before (another replica's, or None).

        Raises :class:`BackplaneUnavailable` when the backplane is down.
        """

    @abc.abstractmethod
    async def history(self, channel: str, after: int, limit: ReadLimit) -> Page[bytes]:
        """The newest retained messages of ``channel`` after offset ``after`` within
        ``limit``, read atomically. Creates nothing for a channel without history.

        Raises :class:`BackplaneUnavailable` when the backplane is down.
        """

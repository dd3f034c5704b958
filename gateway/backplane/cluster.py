"""Redis Cluster backplane: sharded pub/sub (``SSUBSCRIBE``/``SPUBLISH``, Redis 7+).

A classic ``PUBLISH`` on a cluster goes to every node over the cluster bus, so it scales with
nothing; a sharded channel lives on the primary that serves its slot (``<prefix>C`` hashed,
or only its ``{hash tag}``), and a message costs only that node. The replica keeps one
pub/sub connection per primary that serves a channel its clients want (not one per channel or
per client), subscribes there with one ``SSUBSCRIBE`` per slot, and reconciles whenever the
topology may have changed: a lost node connection (failover), a ``MOVED`` answer, or the
server's own ``sunsubscribe`` when a slot migrates away. Reconciling re-reads the slot map,
moves each wanted channel to the node that serves it now, and then tells the hub to fill its
history channels from their streams. Commands (SPUBLISH, the history scripts) go through
redis-py's cluster client, which follows ``MOVED``/``ASK`` itself.

Selected by ``GATEWAY_REDIS_URL=redis+cluster://host:port`` (any node; more seeds after
commas: ``redis+cluster://h1:p1,h2:p2``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
import uuid
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import MovedError, ResponseError

from gateway.backoff import full_jitter
from gateway.backplane.base import (
    Backplane,
    BackplaneUnavailable,
    ChannelNames,
    Confirmations,
    OnMessage,
    Probe,
    RedisOptions,
)
from gateway.backplane.commands import LOST as _LOST
from gateway.backplane.commands import PUBSUB_LOST as _PUBSUB_LOST
from gateway.backplane.commands import RedisCommands
from gateway.history import Page, ReadLimit
from gateway.turns import Turns
from publisher.cluster import parse_cluster_url
from publisher.history import HistoryPolicy

__all__ = ["RedisClusterBackplane"]

log = logging.getLogger("gateway.backplane")

Address = tuple[str, int]


class _Moved(BackplaneUnavailable):
    """A node answered MOVED: the slot map read last is stale."""


class _Node:
    """The pub/sub connection to one primary, and the channels subscribed on it."""

    def __init__(self, address: Address, options: dict[str, Any], backplane: RedisClusterBackplane):
        self.address = address
        self.backplane = backplane
        self.redis = Redis(host=address[0], port=address[1], retry=Retry(NoBackoff(), 0), **options)
        self.pubsub: PubSub | None = None
        self.channels: set[str] = set()  # subscribed here (confirmed or asked)
        self.confirmations = Confirmations()
        self.reader: asyncio.Task[None] | None = None
        self.connected = False
        # A sharded channel in one of this node's slots that only this replica uses: a
        # SPUBLISH to it must come back through this connection (see _probe_loop).
        self.probe_key: bytes | None = None
        self.probes = Probe()
        self.prober: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    async def connect(self, probe_key: bytes | None, timeout: float) -> None:
        self.pubsub = self.redis.pubsub()
        await self.pubsub.connect()  # type: ignore[no-untyped-call]
        self.connected = True
        self.reader = asyncio.create_task(self._read(), name=f"redis node {self.name}")
        if probe_key is not None:
            self.probe_key = probe_key
            await self._ssubscribe([probe_key], timeout)
            self.prober = asyncio.create_task(self._probe_loop(), name=f"probe {self.name}")

    async def subscribe(self, channels: list[str], timeout: float) -> None:
        """SSUBSCRIBE ``channels`` (one slot) and wait for every confirmation."""
        self.channels.update(channels)
        try:
            await self._ssubscribe(
                [self.backplane.names.key(channel) for channel in channels], timeout
            )
        except BaseException:
            self.channels.difference_update(channels)  # not here after all
            raise

    async def _ssubscribe(self, keys: list[bytes], timeout: float) -> None:
        pubsub = self.pubsub
        if pubsub is None:  # lost since it was connected
            raise BackplaneUnavailable(f"lost node {self.name}")
        waiters = [self.confirmations.expect(key) for key in keys]
        try:
            await pubsub.ssubscribe(*keys)
            async with asyncio.timeout(timeout):
                await asyncio.gather(*waiters)
        finally:
            for key, waiter in zip(keys, waiters, strict=True):
                self.confirmations.forget(key, waiter)

    async def unsubscribe(self, channels: list[str]) -> None:
        self.channels.difference_update(channels)
        if self.pubsub is not None and self.connected and channels:
            with contextlib.suppress(*_PUBSUB_LOST):
                await self.pubsub.sunsubscribe(*(self.backplane.names.key(c) for c in channels))

    async def _read(self) -> None:
        assert self.pubsub is not None
        turns = Turns()
        try:
            while True:
                await turns.take()
                try:
                    message = await self.pubsub.get_message(timeout=None)
                except ResponseError as exc:  # MOVED for an SSUBSCRIBE: the map is stale
                    moved = isinstance(exc, MovedError)
                    log.info(
                        "node %s answered %s%s; re-reading the slot map",
                        self.name, "MOVED " if moved else "", exc,
                    )  # fmt: skip
                    self._fail_waiters((_Moved if moved else BackplaneUnavailable)(str(exc)))
                    self.backplane.changed.set()
                    continue
                if message is not None:
                    self._handle(message)
        except _LOST as exc:
            if self.connected:
                log.warning("lost Redis node %s: %s", self.name, exc or type(exc).__name__)
            self.connected = False
            self.backplane.mark_down()
            self._fail_waiters(BackplaneUnavailable(f"lost Redis node {self.name}"))
            self.backplane.changed.set()

    async def _probe_loop(self) -> None:
        """Every probe interval, a SPUBLISH to the probe channel must come back within the
        probe timeout; else this connection is silent (half-open, paused node) and replaced."""
        backplane = self.backplane
        assert self.probe_key is not None
        for number in itertools.count(1):
            await asyncio.sleep(backplane.options.probe_interval)
            timeout = backplane.options.probe_timeout
            try:
                async with asyncio.timeout(timeout):
                    await backplane.spublish(self.probe_key, str(number).encode())
                await self.probes.wait(number, timeout)
            except Exception as exc:  # whatever stops the probe, the connection is suspect
                if not isinstance(exc, (*_LOST, BackplaneUnavailable)):
                    log.exception("probe of Redis node %s failed", self.name)
                log.warning(
                    "Redis node %s is silent: probe not delivered within %.1fs (%s)",
                    self.name,
                    backplane.options.probe_timeout,
                    exc or type(exc).__name__,
                )
                self.connected = False
                self._fail_waiters(BackplaneUnavailable(f"Redis node {self.name} is silent"))
                backplane.mark_down()
                backplane.changed.set()
                return

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        key: bytes = message["channel"]
        if kind == "smessage":
            self.probes.received += 1
        if kind == "smessage" and key == self.probe_key:
            self.probes.arrived(message["data"])
        elif kind == "smessage":
            name = self.backplane.names.channel(key)
            if name is not None:
                self.backplane.deliver(name, message["data"])
        elif kind == "ssubscribe":
            self.confirmations.confirm(key)
        elif kind == "sunsubscribe":
            name = self.backplane.names.channel(key)
            if name is not None and name in self.channels:
                # Not asked for: the slot moved to another node (resharding, failover).
                log.info("node %s dropped channel %s: its slot moved", self.name, name)
                self.channels.discard(name)
                self.backplane.changed.set()

    def _fail_waiters(self, exc: Exception) -> None:
        self.confirmations.fail(exc)

    async def close(self) -> None:
        self.connected = False
        for task in (self.reader, self.prober):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._fail_waiters(BackplaneUnavailable("node connection closed"))
        if self.pubsub is not None:
            with contextlib.suppress(*_LOST):
                await self.pubsub.aclose()  # type: ignore[no-untyped-call]
        with contextlib.suppress(*_LOST):
            await self.redis.aclose()


class RedisClusterBackplane(Backplane):
    name = "redis-cluster"

    def __init__(
        self,
        url: str,
        on_message: OnMessage,
        options: RedisOptions | None = None,
        history: HistoryPolicy | None = None,
    ) -> None:
        super().__init__(on_message, history)
        self.options = options = options or RedisOptions()
        prefix = options.prefix
        self.names = ChannelNames(prefix)
        self._probe_id = uuid.uuid4().hex
        seeds, credentials = parse_cluster_url(url)
        self._connection: dict[str, Any] = {
            **credentials,
            "socket_connect_timeout": options.connect_timeout,
            "socket_timeout": options.connect_timeout,
            "socket_keepalive": True,
        }
        self._cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in seeds],
            max_connections=options.max_connections,
            **self._connection,
        )
        self._commands = RedisCommands(self._cluster, self.names, self.history_policy, sharded=True)
        self.presence = self._commands
        self._wanted: set[str] = set()
        self.nodes: dict[Address, _Node] = {}
        self._owner: dict[str, Address] = {}  # wanted channel -> node it is subscribed on
        self._lock = asyncio.Lock()  # one reconciliation or subscription change at a time
        self.changed = asyncio.Event()  # the topology may have changed: reconcile
        self._mapped = False  # the slot map has been read and every wanted channel placed
        self._ever_up = False
        self._client_ready = False
        self._task: asyncio.Task[None] | None = None
        self._down_since: float | None = None

    @property
    def connected(self) -> bool:
        if not self._mapped or len(self._owner) < len(self._wanted):
            return False  # some wanted channel is not subscribed anywhere right now
        nodes = self.nodes
        return all(a in nodes and nodes[a].connected for a in set(self._owner.values()))

    @property
    def subscribed_channels(self) -> int:
        return len(self._wanted)

    def node_states(self) -> dict[str, bool]:
        """Each node connection the replica holds: address -> connected."""
        return {node.name: node.connected for node in self.nodes.values()}

    def unready_reason(self) -> str:
        down = sorted(name for name, up in self.node_states().items() if not up)
        return super().unready_reason() + (f" ({', '.join(down)} down)" if down else "")

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="redis cluster backplane")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for node in list(self.nodes.values()):
            await node.close()
        self.nodes.clear()
        with contextlib.suppress(*_LOST):
            await self._cluster.aclose()

    # Subscriptions

    async def subscribe(self, channel: str) -> None:
        if not self.connected:
            raise BackplaneUnavailable("backplane is reconnecting to the Redis cluster")
        self._wanted.add(channel)
        try:
            async with self._lock:
                try:
                    await self._place([channel])
                except _Moved:
                    # The slot moved since the map was read: read it again, and place the
                    # channel where it lives now, instead of failing the client's subscribe.
                    await self._cluster.nodes_manager.initialize()
                    await self._place([channel])
        except (*_PUBSUB_LOST, BackplaneUnavailable) as exc:
            self._wanted.discard(channel)
            self._owner.pop(channel, None)
            self.changed.set()
            raise BackplaneUnavailable(f"Redis did not confirm the subscription: {exc}") from None

    async def unsubscribe(self, channel: str) -> None:
        self._wanted.discard(channel)
        async with self._lock:
            address = self._owner.pop(channel, None)
            node = self.nodes.get(address) if address is not None else None
            if node is not None:
                await node.unsubscribe([channel])

    async def _place(self, channels: list[str]) -> None:
        """Subscribe ``channels`` on the primaries that serve them now, one SSUBSCRIBE per slot."""
        by_node: dict[Address, dict[int, list[str]]] = collections.defaultdict(dict)
        for channel in channels:
            address = self._server_of(channel)
            if address is None:
                raise BackplaneUnavailable(f"no node serves channel {channel}")
            slot = self._cluster.keyslot(self.names.prefix + channel)
            by_node[address].setdefault(slot, []).append(channel)
        for address, slots in by_node.items():
            link = await self._node(address)
            for group in slots.values():
                await link.subscribe(group, self.options.subscribe_timeout)
                for channel in group:
                    self._owner[channel] = address

    def _server_of(self, channel: str) -> Address | None:
        """The primary that serves ``channel``'s slot in the slot map last read."""
        server = self._cluster.get_node_from_key(self.names.prefix + channel)
        return (server.host, int(server.port)) if server is not None else None

    async def _node(self, address: Address) -> _Node:
        node = self.nodes.get(address)
        if node is None or not node.connected:
            if node is not None:
                await node.close()
            node = self.nodes[address] = _Node(address, self._connection, self)
            await node.connect(self._probe_key(address), self.options.subscribe_timeout)
        return node

    def _probe_key(self, address: Address) -> bytes | None:
        """A channel no client can name ('#'), hashed by a tag into a slot ``address`` serves."""
        slots = self._cluster.nodes_manager.slots_cache
        name = f"{address[0]}:{address[1]}"
        for number in range(65536):
            tag = format(number, "x")
            owners = slots.get(key_slot(tag.encode()))
            if owners and owners[0].name == name:
                return f"{self.names.prefix}#probe#{self._probe_id}{{{tag}}}".encode()
        return None  # serves no slot: nothing to probe

    async def spublish(self, key: bytes, payload: bytes) -> int:
        return int(await self._cluster.execute_command("SPUBLISH", key, payload))

    # Publishing and history

    async def publish(self, channel: str, envelope: bytes) -> int:
        return await self._commands.publish(channel, envelope)

    async def history(self, channel: str, after: int, limit: ReadLimit) -> Page[bytes]:
        return await self._commands.read(channel, after, limit)

    def keep(self, channel: str) -> None:
        self._wanted.add(channel)  # every (re)connection subscribes what is wanted

    async def acknowledge(self, request_id: str, ack: bytes) -> None:
        await self._commands.acknowledge(request_id, ack)

    async def advertise(self, document: bytes, ttl_ms: int) -> bytes | None:
        return await self._commands.advertise(document, ttl_ms)

    # Keeping up with the topology

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                await self._reconcile()
                attempt = 0
                wait = self.options.probe_interval
            except asyncio.CancelledError:
                raise
            except (*_LOST, BackplaneUnavailable) as exc:
                if self._mapped:
                    log.warning("Redis cluster topology unsettled: %s", exc)
                else:
                    log.warning("cannot reach the Redis cluster: %s", exc)
                self.mark_down()
                wait = full_jitter(attempt, self.options.reconnect_min, self.options.reconnect_max)
                attempt += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self.changed.wait()
            self.changed.clear()

    async def _reconcile(self) -> None:
        """Re-read the slot map; move every wanted channel to the node serving it now."""
        was_up = self.connected
        async with self._lock:
            if not self._client_ready:
                # The first time the whole client (slot map and command parser), later
                # just the slot map.
                await self._cluster.initialize()
                self._client_ready = True
            else:
                await self._cluster.nodes_manager.initialize()
            misplaced: list[str] = []
            for channel in self._wanted:
                address = self._server_of(channel)
                current = self._owner.get(channel)
                holder = self.nodes.get(current) if current is not None else None
                if (
                    address != current
                    or holder is None
                    or not holder.connected
                    or channel not in holder.channels
                ):
                    misplaced.append(channel)
                    if holder is not None and holder.connected and address != current:
                        await holder.unsubscribe([channel])
                    self._owner.pop(channel, None)
            if misplaced:
                await self._place(misplaced)
            in_use = set(self._owner.values())
            for address, node in list(self.nodes.items()):
                if address not in in_use:  # no wanted channel lives there any more
                    await node.close()
                    del self.nodes[address]
            self._mapped = True
        if not was_up and self.connected:
            self._mark_up()
        elif misplaced and self.connected and self.on_resume is not None:
            self.on_resume()  # messages of the moved channels may have gone meanwhile

    def mark_down(self) -> None:
        if self._ever_up and self._down_since is None:
            self._down_since = time.monotonic()

    def _mark_up(self) -> None:
        if not self._ever_up:
            self._ever_up = True
            log.info("connected to the Redis cluster: %d nodes", len(self._cluster.get_nodes()))
            return
        outage = time.monotonic() - (self._down_since or time.monotonic())
        self.outage_seconds += outage
        self.reconnects += 1
        self._down_since = None
        log.info("Redis cluster back after %.2fs; %d channels placed", outage, len(self._wanted))
        if self.on_resume is not None:
            self.on_resume()

"""Redis pub/sub backplane.

One pub/sub connection per replica, subscribed to exactly the channels its clients want (the hub
calls :meth:`subscribe` for a channel's first local subscriber and :meth:`unsubscribe` after its
last). The reader task hands each message to ``on_message`` and goes straight back to reading:
it never awaits a client, so Redis never sees this replica as a slow subscriber.

The replica owns reconnection: redis-py's own retries are off, so a lost connection is seen at
once, readiness turns false, and a fresh connection re-subscribes every wanted channel after a
capped, fully jittered backoff. A connection can also die silently (a half-open TCP connection,
a middlebox that dropped its state): a periodic PUBLISH to a channel only this replica
subscribes to must come back through the subscription within ``probe_timeout``, or the
connection is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from typing import Any

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

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
from publisher.history import HistoryPolicy

__all__ = ["RedisBackplane"]

log = logging.getLogger("gateway.backplane")


class SilentConnection(ConnectionError):
    """The probe did not come back: the subscription is no longer delivering."""


class RedisBackplane(Backplane):
    name = "redis"

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
        where = parse_url(url)  # the node, as metrics and readiness name it
        self._node = where.get("path") or f"{where.get('host')}:{where.get('port', 6379)}"
        connection: dict[str, Any] = {
            "socket_connect_timeout": options.connect_timeout,
            "socket_timeout": options.connect_timeout,
            "socket_keepalive": True,
        }
        # The subscriber never retries on its own: a lost connection must be seen at once.
        # Commands (PUBLISH) retry once, so a pooled connection that died with a Redis
        # restart costs a reconnect, not an error.
        self._subscriber = Redis(
            connection_pool=ConnectionPool.from_url(url, retry=Retry(NoBackoff(), 0), **connection)
        )
        # Commands share a bounded pool and wait for a free connection when a burst (a
        # reconnect storm reading history, many clients publishing) wants more, instead of
        # failing with "Too many connections" past redis-py's default of 100.
        self._redis = Redis(
            connection_pool=BlockingConnectionPool.from_url(
                url,
                retry=Retry(NoBackoff(), 1),
                max_connections=options.max_connections,
                timeout=options.subscribe_timeout,
                **connection,
            )
        )
        self._commands = RedisCommands(self._redis, self.names, self.history_policy, sharded=False)
        self.presence = self._commands
        # A channel no client can name ("#" is not allowed in channel names): it keeps the
        # connection in subscribe mode, its confirmation marks the end of a (re)subscribe, and
        # the probes travel through it.
        self._probe = f"{prefix}#probe#{uuid.uuid4().hex}".encode()
        self._probe_numbers = itertools.count(1)
        self._probes = Probe()
        self._wanted: set[str] = set()
        self._confirmations = Confirmations()
        self._pubsub: PubSub | None = None
        self._connected = False
        self._lock = asyncio.Lock()  # keeps SUBSCRIBE/UNSUBSCRIBE in the order they were asked
        self._task: asyncio.Task[None] | None = None
        # What operators want to know: counted here, exported as metrics.
        self.connects = 0  # successful (re)connections
        self.reconnects = 0  # connections after a loss
        self.outage_seconds = 0.0  # total time disconnected after the first connection
        self._down_since: float | None = None

    @property
    def connected(self) -> bool:
        return self._connected

    def node_states(self) -> dict[str, bool]:
        return {self._node: self._connected}

    @property
    def subscribed_channels(self) -> int:
        return len(self._wanted)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="redis backplane")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._drop_connection(None)
        for client in (self._subscriber, self._redis):
            await client.aclose()
            await client.connection_pool.disconnect()

    async def subscribe(self, channel: str) -> None:
        key = self.names.key(channel)
        self._wanted.add(channel)
        waiter: asyncio.Future[None] | None = None
        try:
            async with self._lock:
                # Checked once the lock is ours: the connection may have been lost while
                # this waited behind other subscriptions.
                pubsub = self._pubsub
                if not self._connected or pubsub is None:
                    raise BackplaneUnavailable("backplane is reconnecting to Redis")
                waiter = self._confirmations.expect(key)
                await pubsub.subscribe(key)
            async with asyncio.timeout(self.options.subscribe_timeout):
                await waiter
        except (*_PUBSUB_LOST, BackplaneUnavailable) as exc:
            self._wanted.discard(channel)
            await self.unsubscribe(channel)  # in case the SUBSCRIBE lands after all
            raise BackplaneUnavailable(f"Redis did not confirm the subscription: {exc}") from None
        finally:
            if waiter is not None:
                self._confirmations.forget(key, waiter)

    async def unsubscribe(self, channel: str) -> None:
        self._wanted.discard(channel)
        try:
            async with self._lock:
                pubsub = self._pubsub
                if not self._connected or pubsub is None:
                    return  # a fresh connection subscribes only what is still wanted
                await pubsub.unsubscribe(self.names.key(channel))
        except _PUBSUB_LOST as exc:
            log.debug("unsubscribe %s failed: %s", channel, exc)

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

    # The connection's life

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                await self._connect()
                attempt = 0
                await self._serve()
            except asyncio.CancelledError:
                raise
            except _LOST as exc:
                was_connected = self._connected
                await self._drop_connection(exc)
                delay = full_jitter(attempt, self.options.reconnect_min, self.options.reconnect_max)
                attempt += 1
                why = str(exc) or type(exc).__name__
                if was_connected:
                    log.warning("lost Redis: %s; reconnecting in %.2fs", why, delay)
                else:
                    log.warning("cannot reach Redis: %s; retry %d in %.2fs", why, attempt, delay)
                await asyncio.sleep(delay)

    async def _connect(self) -> None:
        pubsub = self._subscriber.pubsub()
        self._pubsub = pubsub
        async with self._lock:
            wanted = set(self._wanted)
            await pubsub.subscribe(*(self.names.key(c) for c in wanted), self._probe)
        # Redis answers in order: the probe's confirmation comes after every other one.
        while True:
            message = await pubsub.get_message(timeout=self.options.subscribe_timeout)
            if message is None:
                raise TimeoutError("no subscribe confirmation from Redis")
            if message["type"] == "subscribe" and message["channel"] == self._probe:
                break
            self._handle(message)
        self._connected = True
        self.connects += 1
        if self._down_since is None:
            log.info("connected to Redis")
        else:
            outage = time.monotonic() - self._down_since
            self.outage_seconds += outage
            self.reconnects += 1
            self._down_since = None
            log.info(
                "reconnected to Redis after %.2fs; %d channels re-subscribed", outage, len(wanted)
            )
            if self.on_resume is not None:
                self.on_resume()
        for channel in wanted - self._wanted:  # left while we were reconnecting
            await self.unsubscribe(channel)

    async def _serve(self) -> None:
        """Read and probe until either fails; the first failure ends both."""
        reader = asyncio.create_task(self._read(), name="redis reader")
        prober = asyncio.create_task(self._probe_loop(), name="redis probe")
        try:
            done, _ = await asyncio.wait({reader, prober}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises what ended it
        finally:
            for task in (reader, prober):
                task.cancel()
            await asyncio.gather(reader, prober, return_exceptions=True)

    async def _read(self) -> None:
        pubsub = self._pubsub
        assert pubsub is not None
        handle = self._handle
        turns = Turns()
        while True:
            message = await pubsub.get_message(timeout=None)
            if message is not None:
                handle(message)
            await turns.take()

    async def _probe_loop(self) -> None:
        timeout = self.options.probe_timeout
        while True:
            await asyncio.sleep(self.options.probe_interval)
            number = next(self._probe_numbers)
            try:
                # The PUBLISH has a deadline too: its connection can be as dead as the
                # subscriber's, and would otherwise wait for the socket timeout.
                async with asyncio.timeout(timeout):
                    receivers = await self._redis.publish(self._probe, str(number))
                if receivers == 0:
                    raise SilentConnection("Redis no longer knows our subscription")
                await self._probes.wait(number, timeout)
            except TimeoutError:
                raise SilentConnection(f"probe not delivered within {timeout}s") from None

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "message":
            channel: bytes = message["channel"]
            self._probes.received += 1
            if channel == self._probe:
                self._probes.arrived(message["data"])
            elif (name := self.names.channel(channel)) is not None:
                self.deliver(name, message["data"])
        elif kind == "subscribe":
            self._confirmations.confirm(message["channel"])

    async def _drop_connection(self, exc: BaseException | None) -> None:
        if self._connected and self._down_since is None:
            self._down_since = time.monotonic()
        self._connected = False
        self._confirmations.fail(BackplaneUnavailable(f"lost Redis: {exc}"))
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(*_LOST):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

"""What the Redis backplanes send as commands: publishes (plain, or numbered into a history
channel's stream) and history reads.

One object serves both backplanes, through a client that runs commands and scripts: a
``Redis`` for ``redis``, a ``RedisCluster`` for ``redis-cluster`` (where it publishes with
``SPUBLISH``; the keys of one channel share a slot, so each script runs on one node). Redis
errors become :class:`BackplaneUnavailable`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from redis.exceptions import RedisError

from gateway.backplane.base import BackplaneUnavailable, ChannelNames, Member, PresenceStore
from gateway.history import Page, ReadLimit
from publisher.control import ACK_LUA, ACK_TTL_MS, ack_key
from publisher.history import (
    APPEND_LUA,
    READ_LUA,
    Appended,
    HistoryPolicy,
    append_keys,
    history_keys,
)
from publisher.kinds import KINDS_KEY
from publisher.presence import (
    JOIN_LUA,
    LEAVE_LUA,
    PURGE,
    REPLICAS,
    STATS_LUA,
    TOUCH_LUA,
    presence_keys,
    replica_key,
)
from publisher.presence import READ_LUA as PRESENCE_READ_LUA

__all__ = ["LOST", "PUBSUB_LOST", "RedisCommands"]

#: What a lost or failing Redis raises.
LOST = (RedisError, OSError, asyncio.TimeoutError)
#: ... and what a (S)SUBSCRIBE on a lost pub/sub connection may raise: uvloop says "the
#: handler is closed" (RuntimeError) when the socket went before redis-py noticed.
PUBSUB_LOST = (*LOST, RuntimeError)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class RedisCommands(PresenceStore):
    def __init__(
        self, client: Any, names: ChannelNames, policy: HistoryPolicy, *, sharded: bool = False
    ) -> None:
        self.client = client
        self.names = names
        self.policy = policy
        self.sharded = sharded
        self._publish = "SPUBLISH" if sharded else "PUBLISH"
        self._append = client.register_script(APPEND_LUA)
        self._read = client.register_script(READ_LUA)
        self._ack = client.register_script(ACK_LUA)
        self._join = client.register_script(JOIN_LUA)
        self._leave = client.register_script(LEAVE_LUA)
        self._page = client.register_script(PRESENCE_READ_LUA)
        self._stats = client.register_script(STATS_LUA)
        self._touch = client.register_script(TOUCH_LUA)
        self._replicas = self.names.prefix + REPLICAS

    async def publish(self, channel: str, envelope: bytes) -> int:
        """Publish (a history channel's message numbered and stored in the same step);
        return how many subscribed connections got it."""
        try:
            if self.policy.applies(channel):
                keys = append_keys(self.names.prefix, channel)
                key = self.names.prefix + channel
                args = self.policy.append_args(key, envelope, sharded=self.sharded)
                return Appended.from_reply(await self._append(keys, args)).receivers
            key_bytes = self.names.key(channel)
            return int(await self.client.execute_command(self._publish, key_bytes, envelope))
        except LOST as exc:
            raise BackplaneUnavailable(f"Redis is unavailable: {exc}") from None

    async def acknowledge(self, request_id: str, ack: bytes) -> None:
        try:
            await self._ack([ack_key(self.names.prefix, request_id)], [ack, ACK_TTL_MS])
        except LOST as exc:
            raise BackplaneUnavailable(f"Redis is unavailable: {exc}") from None

    async def advertise(self, document: bytes, ttl_ms: int) -> bytes | None:
        try:
            previous: bytes | None = await self.client.set(
                self.names.prefix + KINDS_KEY, document, px=ttl_ms, get=True
            )
        except LOST as exc:
            raise BackplaneUnavailable(f"Redis is unavailable: {exc}") from None
        return previous

    async def read(self, channel: str, after: int, limit: ReadLimit) -> Page[bytes]:
        """The newest entries after ``after`` within ``limit``, in one atomic read."""
        keys = history_keys(self.names.prefix, channel)
        try:
            raw_epoch, top, raw_entries = await self._read(
                keys, self.policy.read_args(after, limit.messages, limit.bytes)
            )
        except LOST as exc:
            raise BackplaneUnavailable(f"Redis is unavailable: {exc}") from None
        if raw_epoch is None:
            return Page(None, 0)
        entries = [(int(entry_id.split(b"-", 1)[1]), fields[1]) for entry_id, fields in raw_entries]
        return Page(raw_epoch.decode(), int(top), entries)

    # Presence (publisher.presence)

    async def _run(self, script: Any, channel: str, args: list[Any]) -> Any:
        try:
            return await script(
                presence_keys(self.names.prefix, channel), [PURGE, _now_ms(), *args]
            )
        except LOST as exc:
            raise BackplaneUnavailable(f"Redis is unavailable: {exc}") from None

    async def join(self, channel: str, members: list[Member], ttl_ms: int) -> int:
        args: list[Any] = [_now_ms() + ttl_ms, ttl_ms]
        for client, user, entry in members:
            args += (client, user or "", entry)
        return int(await self._run(self._join, channel, args))

    async def touch(self, channel: str, clients: list[str], ttl_ms: int) -> int:
        args: list[Any] = [_now_ms() + ttl_ms, ttl_ms, *clients]
        return int(await self._run(self._touch, channel, args))

    async def leave(self, channel: str, clients: list[str]) -> list[bytes]:
        return list(await self._run(self._leave, channel, list(clients)))

    async def page(self, channel: str, cursor: str, count: int) -> tuple[str, list[bytes]]:
        following, entries = await self._run(self._page, channel, [cursor, count])
        return (following.decode() if isinstance(following, bytes) else str(following)), entries

    async def stats(self, channel: str) -> tuple[int, int]:
        clients, users = await self._run(self._stats, channel, [])
        return int(clients), int(users)

    async def event(self, channel: str, payload: bytes) -> None:
        try:
            await self.client.execute_command(self._publish, self.names.key(channel), payload)
        except LOST as exc:
            raise BackplaneUnavailable(f"Redis is unavailable: {exc}") from None

    async def renew_lease(
        self, replica: str, ttl_ms: int, added: list[str], removed: list[str]
    ) -> None:
        members = replica_key(self.names.prefix, replica)
        try:
            # Two keys in two slots on a cluster: two commands, the set first, so that a lease
            # never names members it has not recorded.
            if added:
                await self.client.sadd(members, *added)
            if removed:
                await self.client.srem(members, *removed)
            # Kept long past the lease, for a survivor to find, but not forever if none does.
            await self.client.pexpire(members, ttl_ms * 360)
            await self.client.zadd(self._replicas, {replica: _now_ms() + ttl_ms})
        except LOST as exc:
            raise BackplaneUnavailable(f"Redis is unavailable: {exc}") from None

    async def claim_dead(self) -> list[tuple[str, list[bytes]]]:
        claimed: list[tuple[str, list[bytes]]] = []
        try:
            dead = await self.client.zrange(
                self._replicas, "-inf", f"({_now_ms()}", byscore=True, offset=0, num=16
            )
            for raw in dead:
                if not await self.client.zrem(self._replicas, raw):
                    continue  # another replica claimed it first
                replica = raw.decode()
                key = replica_key(self.names.prefix, replica)
                claimed.append((replica, list(await self.client.smembers(key))))
                await self.client.delete(key)
        except LOST as exc:
            raise BackplaneUnavailable(f"Redis is unavailable: {exc}") from None
        return claimed

    async def end_lease(self, replica: str) -> None:
        try:
            await self.client.zrem(self._replicas, replica)
            await self.client.delete(replica_key(self.names.prefix, replica))
        except LOST as exc:
            raise BackplaneUnavailable(f"Redis is unavailable: {exc}") from None

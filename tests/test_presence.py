"""Presence and join/leave: who is on a channel across replicas, the frames that say who came
and went (coalesced), and the leaves of a replica that died, sent once by a survivor.

Real replicas on the memory backplane, on one real Redis and on the cluster harness; replicas
are killed with SIGKILL and Redis restarted on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from publisher import AsyncPublisher, Publisher
from tests.harness import (
    GatewayFactory,
    RedisClusterServers,
    RedisServer,
    async_wait_until,
    client,
    expect_silence,
    recv_json,
    wspublish,
)
from tests.test_redis_outages import FAST_RECOVERY
from tests.test_security import SECRET, refused, token

PRESENCE = {
    "GATEWAY_PRESENCE_CHANNELS": "room.*,room{*",
    "GATEWAY_JOIN_LEAVE_CHANNELS": "room.*,room{*",
    "GATEWAY_PRESENCE_LEASE": "1",
    "GATEWAY_PRESENCE_TTL": "10",
}
WITH_TOKENS = {**PRESENCE, "GATEWAY_JWT_SECRET": SECRET}
LEASE = float(PRESENCE["GATEWAY_PRESENCE_LEASE"])
#: What the documented bounds leave out: a frame's way from one replica through Redis to
#: another and its client (a few milliseconds), and a loaded machine's scheduling.
REAP_ALLOWANCE = 0.25


def as_user(gateway: Any, user: str, channels: str = "", **claims: Any) -> Any:
    claims.setdefault("channels", ["*"])
    claims.setdefault("presence", ["room.*"])
    query = f"&channels={channels}" if channels else ""
    return client(f"{gateway.ws_url}?token={token(sub=user, **claims)}{query}")


def drop(sockets: list[ClientConnection]) -> None:
    for ws in sockets:
        ws.transport.abort()


async def ask(ws: ClientConnection, payload: dict[str, Any]) -> dict[str, Any]:
    """Send a request and return its reply, passing over the frames that come meanwhile
    (subscribed, join, leave)."""
    await ws.send(json.dumps(payload))
    while True:
        frame = await recv_json(ws)
        if frame.get("id") == payload["id"]:
            return frame


async def members(ws: ClientConnection, channel: str) -> list[dict[str, Any]]:
    """Every member, page after page."""
    found: list[dict[str, Any]] = []
    cursor = "0"
    while True:
        page = await ask(ws, {"op": "presence", "channel": channel, "cursor": cursor, "id": 1})
        assert page["op"] == "presence", page
        found.extend(page["members"])
        cursor = page["cursor"]
        if cursor == "0":
            return found


async def events(ws: ClientConnection, op: str, count: int, timeout: float) -> list[list[Any]]:
    """The members lists of ``op`` frames until ``count`` members were named or counted
    (``more``) in all."""
    frames: list[list[Any]] = []
    deadline = time.monotonic() + timeout
    counted = 0
    while counted < count:
        frame = await recv_json(ws, timeout=max(0.1, deadline - time.monotonic()))
        if frame["op"] == op:
            frames.append(frame["members"])
            counted += len(frame["members"]) + frame.get("more", 0)
    return frames


async def test_presence_and_join_leave_on_the_memory_backplane(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory(PRESENCE)
    async with client(f"{gateway.ws_url}?channels=room.1") as first:
        assert await recv_json(first) == {"op": "subscribed", "channel": "room.1"}
        [[me]] = await events(first, "join", 1, 5)  # its own, which tells it its client id
        assert me["user"] is None
        async with client(f"{gateway.ws_url}?channels=room.1") as second:
            await recv_json(second)
            [[other]] = await events(first, "join", 1, 5)
            assert other["client"] != me["client"]
            assert sorted(m["client"] for m in await members(first, "room.1")) == sorted(
                [me["client"], other["client"]]
            )
            stats = await ask(first, {"op": "presence_stats", "channel": "room.1", "id": 2})
            assert stats == {
                "op": "presence_stats",
                "channel": "room.1",
                "id": 2,
                "clients": 2,
                "users": 0,
            }
        assert await events(first, "leave", 1, 5) == [[other]]
        assert await members(first, "room.1") == [me]
        # Pages are exact here: one member each, then the end.
        async with client(f"{gateway.ws_url}?channels=room.1") as third:
            await recv_json(third)
            [[newcomer]] = await events(first, "join", 1, 5)
            page = await ask(first, {"op": "presence", "channel": "room.1", "limit": 1, "id": 7})
            assert (page["members"], page["cursor"]) == ([me], "1")
            page = await ask(
                first, {"op": "presence", "channel": "room.1", "limit": 1, "cursor": "1", "id": 8}
            )
            assert (page["members"], page["cursor"]) == ([newcomer], "0")


async def test_presence_is_one_view_across_replicas_with_users_and_info(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    env = {**WITH_TOKENS, "GATEWAY_REDIS_URL": redis_server.url}
    here, there = gateway_factory(env), gateway_factory(env)
    async with as_user(here, "alice", "room.1", info={"name": "Alice"}) as alice:
        await recv_json(alice)
        await events(alice, "join", 1, 5)
        async with (
            as_user(there, "bob", "room.1") as bob,
            as_user(there, "bob", "room.1") as bob_again,
        ):
            joined = await events(alice, "join", 2, 5)  # seen on the other replica
            assert sorted(m["user"] for frame in joined for m in frame) == ["bob", "bob"]
            listed = {m["user"]: m for m in await members(bob, "room.1")}
            assert listed["alice"]["info"] == {"name": "Alice"} and "info" not in listed["bob"]
            assert len(await members(alice, "room.1")) == 3
            stats = await ask(alice, {"op": "presence_stats", "channel": "room.1", "id": 3})
            assert (stats["clients"], stats["users"]) == (3, 2)
            # Services read it too: the library, sync and async, and wspublish.
            with Publisher(redis_server.url) as publisher:
                assert sorted(m["user"] for m in publisher.presence("room.1")) == [
                    "alice",
                    "bob",
                    "bob",
                ]
                assert publisher.presence_stats("room.1") == (3, 2)
            async with AsyncPublisher(redis_server.url) as publisher:
                assert await publisher.presence_stats("room.1") == (3, 2)
            env = {"PUBLISHER_REDIS_URL": redis_server.url}
            done = await asyncio.to_thread(wspublish, "room.1", "--presence-stats", env=env)
            assert done.stdout == "clients 3 users 2\n", done.stderr
            done = await asyncio.to_thread(wspublish, "room.1", "--presence", env=env)
            assert sorted(json.loads(line)["user"] for line in done.stdout.splitlines()) == [
                "alice",
                "bob",
                "bob",
            ]
            assert wspublish("room.1", "{}", "--presence", env=env).returncode == 2
            await bob_again.close()
            [[gone]] = await events(alice, "leave", 1, 5)
            assert gone["user"] == "bob"
            stats = await ask(alice, {"op": "presence_stats", "channel": "room.1", "id": 4})
            assert (stats["clients"], stats["users"]) == (2, 2)
            # Unsubscribing is leaving too.
            await ask(bob, {"op": "unsubscribe", "channel": "room.1", "id": 5})
            [[gone]] = await events(alice, "leave", 1, 5)
            assert gone["user"] == "bob"
    assert here.metric("wsgateway_presence_members_total", event="join") == 1


async def test_a_killed_replica_s_clients_leave_once_within_the_lease(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """200 clients on a replica that is SIGKILLed: every leave arrives exactly once, from
    the two survivors together, within the documented bound (lease + a third of it, plus
    the window), and presence no longer lists them."""
    env = {**WITH_TOKENS, "GATEWAY_REDIS_URL": redis_server.url}
    survivors = [gateway_factory(env), gateway_factory(env)]
    doomed = gateway_factory(env)
    async with contextlib.AsyncExitStack() as stack:
        watchers = [
            await stack.enter_async_context(as_user(g, f"watch{n}", "room.big"))
            for n, g in enumerate(survivors)
        ]
        for ws in watchers:
            await recv_json(ws)
        await events(watchers[0], "join", 2, 5)
        doomed_clients = []
        for n in range(200):
            ws = await stack.enter_async_context(as_user(doomed, f"user{n}", "room.big"))
            doomed_clients.append(ws)
        for ws in doomed_clients:
            await recv_json(ws)
        joined = await events(watchers[0], "join", 200, 15)
        assert all(len(frame) <= 100 for frame in joined)
        await events(watchers[1], "join", 202, 15)  # the second watcher saw them all too
        # Killed the moment its clients' joins are seen elsewhere: before, the lease named
        # only the members of its last renewal, and these were reaped as "0 members".
        doomed.signal(signal.SIGKILL)
        killed = time.monotonic()
        first = await events(watchers[0], "leave", 1, LEASE + LEASE / 3 + REAP_ALLOWANCE)
        first_at = time.monotonic() - killed
        rest = await events(watchers[0], "leave", 200 - len(first[0]), 10)
        elapsed = time.monotonic() - killed
        left = first + rest
        users = [m["user"] for frame in left for m in frame]
        assert sorted(users) == sorted(f"user{n}" for n in range(200))  # each exactly once
        assert all(len(frame) <= 100 for frame in left)
        # The first frame within the lease and a third, then one a window (0.1 s).
        assert first_at < LEASE + LEASE / 3 + REAP_ALLOWANCE, first_at
        assert elapsed < first_at + 0.1 * (len(left) - 1) + REAP_ALLOWANCE, (elapsed, len(left))
        await expect_silence(watchers[0], 1.0)  # no second copy from the other survivor
        assert sorted(m["user"] for m in await members(watchers[1], "room.big")) == [
            "watch0",
            "watch1",
        ]
        reaped = sum(
            g.metric("wsgateway_presence_members_total", event="reaped") for g in survivors
        )
        assert reaped == 200


async def test_a_replica_killed_as_its_clients_join_still_sends_their_leaves(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """A replica SIGKILLed the moment another replica's client sees its clients' join: a
    few milliseconds after it wrote them, long before its next lease renewal. Before, the
    lease named only the members of the last renewal, the dead replica was reaped as "0
    members" and these stayed listed, with no leave, until GATEWAY_PRESENCE_TTL. Now each
    member whose join was announced gets one leave, the first within the lease and a third."""
    env = {**WITH_TOKENS, "GATEWAY_REDIS_URL": redis_server.url}
    survivor, doomed = gateway_factory(env), gateway_factory(env)
    async with contextlib.AsyncExitStack() as stack:
        watcher = await stack.enter_async_context(as_user(survivor, "watch", "room.k"))
        await recv_json(watcher)
        await events(watcher, "join", 1, 5)

        async def arrive(n: int) -> None:
            ws = await stack.enter_async_context(as_user(doomed, f"user{n}", "room.k"))
            await recv_json(ws)

        await asyncio.gather(*(arrive(n) for n in range(10)))
        joined = (await events(watcher, "join", 1, 5))[0]
        doomed.signal(signal.SIGKILL)
        killed = time.monotonic()
        announced = {m["user"] for m in joined}
        left: list[str] = []
        first_at = None
        deadline = killed + LEASE + LEASE / 3 + REAP_ALLOWANCE + 1.0
        while set(left) < announced or len(left) < len(announced):
            frame = await recv_json(watcher, timeout=max(0.1, deadline - time.monotonic()))
            if frame["op"] == "join":  # announced before the kill, arriving after it
                announced |= {m["user"] for m in frame["members"]}
            elif frame["op"] == "leave":
                first_at = first_at or time.monotonic() - killed
                left += [m["user"] for m in frame["members"]]
        assert first_at is not None and first_at < LEASE + LEASE / 3 + REAP_ALLOWANCE, first_at
        assert sorted(left) == sorted(set(left)) and set(left) <= {f"user{n}" for n in range(10)}
        assert announced <= set(left), (announced, left)
        listed = await ask(watcher, {"op": "presence_stats", "channel": "room.k", "id": 1})
        assert listed["clients"] == 1


@pytest.mark.parametrize("backplane", ["memory", "redis"])
async def test_leaving_and_coming_back_within_a_window_keeps_the_member(
    request: pytest.FixtureRequest, gateway_factory: GatewayFactory, backplane: str
) -> None:
    """A client that unsubscribes and subscribes again at once (as a delta client that lost
    its base does): before, the join was written, then the leave, and the member vanished
    from presence (and from the replica's lease) while still subscribed. Now nothing
    changes, and nobody is told anything."""
    env = dict(PRESENCE)
    if backplane == "redis":
        env["GATEWAY_REDIS_URL"] = request.getfixturevalue("redis_server").url
    gateway = gateway_factory(env)
    async with (
        client(f"{gateway.ws_url}?channels=room.r") as watcher,
        client(f"{gateway.ws_url}?channels=room.r") as ws,
    ):
        await recv_json(watcher)
        await recv_json(ws)
        await events(watcher, "join", 2, 5)
        for n in range(3):
            assert (await ask(ws, {"op": "unsubscribe", "channel": "room.r", "id": n}))["op"] == (
                "unsubscribed"
            )
            assert (await ask(ws, {"op": "subscribe", "channel": "room.r", "id": n}))["op"] == (
                "subscribed"
            )
        await expect_silence(watcher, 0.5)  # no leave, no join: the windows went by
        stats = await ask(watcher, {"op": "presence_stats", "channel": "room.r", "id": 1})
        assert stats["clients"] == 2, stats


async def test_members_redis_lost_are_written_and_leased_again(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """A replica frozen (SIGSTOP) past its lease is reaped by a survivor, which removes its
    members and sends their leaves. Thawed, it finds them missing at its next renewal and
    writes them again, recording them in its lease too: killed afterwards, they get their
    leave again. Before, they came back to presence without the lease, and stayed there
    after its death until GATEWAY_PRESENCE_TTL."""
    env = {**PRESENCE, "GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_PRESENCE_TTL": "4"}
    survivor, doomed = gateway_factory(env), gateway_factory(env)
    async with (
        client(f"{survivor.ws_url}?channels=room.f") as watcher,
        client(f"{doomed.ws_url}?channels=room.f"),
    ):
        await recv_json(watcher)
        await events(watcher, "join", 2, 5)
        doomed.signal(signal.SIGSTOP)
        await events(watcher, "leave", 1, LEASE + LEASE / 3 + REAP_ALLOWANCE)
        doomed.signal(signal.SIGCONT)

        async def counted() -> int:
            stats = await ask(watcher, {"op": "presence_stats", "channel": "room.f", "id": 1})
            return int(stats["clients"])

        deadline = time.monotonic() + 4 / 3 + 1.0  # its next renewal of the TTL
        while await counted() != 2:
            assert time.monotonic() < deadline, "not written again"
            await asyncio.sleep(0.1)
        doomed.signal(signal.SIGKILL)
        await events(watcher, "leave", 1, LEASE + LEASE / 3 + REAP_ALLOWANCE)
        assert await counted() == 1


async def test_a_join_storm_of_large_entries_is_counted_past_128_kib(
    gateway_factory: GatewayFactory,
) -> None:
    """150 members with an info near 1 KiB join at once: three a frame would take 50
    windows (5 s) to name, so past 128 KiB of waiting entries the frame names what fits
    and counts the rest."""
    gateway = gateway_factory(WITH_TOKENS)
    info = {"bio": "x" * 1000}
    async with contextlib.AsyncExitStack() as stack:
        watcher = await stack.enter_async_context(as_user(gateway, "watch", "room.s"))
        await recv_json(watcher)
        await events(watcher, "join", 1, 5)
        crowd = [
            await stack.enter_async_context(as_user(gateway, f"u{n}", "room.s", info=info))
            for n in range(150)
        ]
        for ws in crowd:
            await recv_json(ws)
        frames: list[dict[str, Any]] = []
        while sum(len(f["members"]) + f.get("more", 0) for f in frames) < 150:
            frame = await recv_json(watcher, timeout=5)
            if frame["op"] == "join":
                frames.append(frame)
    assert all(len(f["members"]) <= 3 for f in frames)
    assert any(f.get("more", 0) > 0 for f in frames), [len(f["members"]) for f in frames]
    assert len(frames) <= 150 * 1100 // (128 * 1024) + 10, len(frames)


async def test_churn_around_renewals_leaves_no_member_behind(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """Clients join and leave presence channels as fast as they can while the replica
    renews its members (every third of a 4 s TTL, and a rebuild after its start). Before,
    a renewal wrote its own snapshot of the members outside the lock that orders joins and
    leaves: members that joined and left around it stayed listed in Redis, with no leave
    announced, until their TTL. Now, moments after the churn stops, Redis lists nobody."""
    env = {
        **PRESENCE,
        "GATEWAY_REDIS_URL": redis_server.url,
        "GATEWAY_PRESENCE_TTL": "4",
        "GATEWAY_RATE_LIMIT": "100000",
    }
    gateway = gateway_factory(env)
    stop = time.monotonic() + 4.5  # at least two renewals

    async def churn(worker: int) -> int:
        rounds = 0
        async with client(gateway.ws_url) as ws:
            while time.monotonic() < stop:
                # 50 memberships held a few milliseconds at a time, some across a renewal.
                channels = [f"room.c{worker}.{rounds}.{n}" for n in range(50)]
                for op in ("subscribe", "unsubscribe"):
                    for channel in channels:
                        await ws.send(json.dumps({"op": op, "channel": channel}))
                    for _ in channels:
                        while (await recv_json(ws))["op"] not in (op + "d",):
                            pass
                rounds += 1
        return rounds * 50

    joins = await asyncio.gather(*(churn(n) for n in range(4)))
    assert sum(joins) > 2000, joins
    await asyncio.sleep(0.5)  # the last leaves written (a window), well before the TTL
    listed = {
        key: redis_server.command("HLEN", key)
        for key in redis_server.client_keys()
        if key.endswith(":presence")
    }
    assert sum(listed.values()) == 0, {k: n for k, n in listed.items() if n}
    assert gateway.metric("wsgateway_presence_members_total", event="join") == gateway.metric(
        "wsgateway_presence_members_total", event="leave"
    )


async def test_a_leave_storm_beyond_a_thousand_is_announced_by_count(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """1,150 members of a killed replica: the watcher gets one frame naming what fits in
    4 KiB of them (at most 100) and counting the others, not 12 frames, and presence is
    exact."""
    env = {**PRESENCE, "GATEWAY_REDIS_URL": redis_server.url}
    survivor, doomed = gateway_factory(env), gateway_factory(env)
    async with contextlib.AsyncExitStack() as stack:
        watcher = await stack.enter_async_context(client(f"{survivor.ws_url}?channels=room.big"))
        await recv_json(watcher)
        # Not read after their subscribe: their reading pauses under the join frames, so
        # they would not see the kill either; they are dropped after it, not closed.
        crowd = [await connect(f"{doomed.ws_url}?channels=room.big") for _ in range(1150)]
        stack.callback(drop, crowd)
        for ws in crowd:
            await recv_json(ws)
        await events(watcher, "join", 1151, 30)
        doomed.signal(signal.SIGKILL)
        frame = await recv_json(watcher, timeout=10)
        while frame["op"] != "leave":
            frame = await recv_json(watcher, timeout=10)
        listed = frame["members"]
        assert len(listed) + frame["more"] == 1150
        assert 50 <= len(listed) <= 100, len(listed)
        assert len(",".join(json.dumps(m, separators=(",", ":")) for m in listed)) <= 4096
        await expect_silence(watcher, 1.0)
        stats = await ask(watcher, {"op": "presence_stats", "channel": "room.big", "id": 1})
        assert stats["clients"] == 1


async def test_presence_is_rebuilt_from_the_live_sessions_after_redis_restarts(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    env = {**WITH_TOKENS, **FAST_RECOVERY, "GATEWAY_REDIS_URL": redis_server.url}
    gateway = gateway_factory(env)
    async with as_user(gateway, "alice", "room.1") as alice, as_user(gateway, "bob", "room.1"):
        await async_wait_until(lambda: redis_server.command("HLEN", "{ws:room.1}:presence") == 2)
        redis_server.kill()  # not durable: everything in it is gone
        await async_wait_until(lambda: gateway.http("/readyz")[0] == 503)
        redis_server.start()
        await async_wait_until(lambda: gateway.http("/readyz")[0] == 200, timeout=15)
        await async_wait_until(
            lambda: redis_server.command("HLEN", "{ws:room.1}:presence") == 2, timeout=5
        )
        with contextlib.suppress(TimeoutError):
            while True:  # what was in flight before the outage
                await recv_json(alice, timeout=0.2)
        assert sorted(m["user"] for m in await members(alice, "room.1")) == ["alice", "bob"]


async def test_presence_on_a_redis_cluster(
    cluster: RedisClusterServers, gateway_factory: GatewayFactory
) -> None:
    env = {**WITH_TOKENS, "GATEWAY_REDIS_URL": cluster.url}
    here, there = gateway_factory(env), gateway_factory(env)
    for channel in ("room.plain", "room{7}.chat"):
        async with (
            as_user(here, "alice", channel, presence=["*"]) as alice,
            as_user(there, "bob", channel, presence=["*"]) as bob,
        ):
            await recv_json(alice)
            await recv_json(bob)
            await events(alice, "join", 2, 5)
            assert sorted(m["user"] for m in await members(bob, channel)) == ["alice", "bob"]
            await bob.close()
            [[gone]] = await events(alice, "leave", 1, 5)
            assert gone["user"] == "bob"


async def test_a_join_storm_is_coalesced_and_presence_pages(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    env = {**PRESENCE, "GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_PRESENCE_PAGE": "100"}
    gateway = gateway_factory(env)
    async with contextlib.AsyncExitStack() as stack:
        watcher = await stack.enter_async_context(client(f"{gateway.ws_url}?channels=room.x"))
        await recv_json(watcher)
        await events(watcher, "join", 1, 5)
        crowd = [
            await stack.enter_async_context(client(f"{gateway.ws_url}?channels=room.x"))
            for _ in range(300)
        ]
        for ws in crowd:
            await recv_json(ws)
        frames = await events(watcher, "join", 300, 15)
        # 300 joins arrived within a few windows: a handful of frames, none over 100.
        assert all(len(frame) <= 100 for frame in frames) and len(frames) <= 30, [
            len(f) for f in frames
        ]
        # ... and none over 4 KiB of entries (a member with a 1 KiB info, 2 a frame).
        assert all(len(json.dumps(frame, separators=(",", ":"))) <= 4096 + 2 for frame in frames)
        listed = await members(watcher, "room.x")
        assert len({m["client"] for m in listed}) == 301
        # Redis returns a hash of up to 512 fields whole (hash-max-listpack-entries), whatever
        # the limit; beyond that, pages of about the limit (the memory test pages exactly).
        page = await ask(watcher, {"op": "presence", "channel": "room.x", "limit": 5, "id": 9})
        assert (len(page["members"]), page["cursor"]) == (301, "0")


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ({"op": "presence", "channel": "news", "id": 1}, "bad_request"),  # no presence there
        ({"op": "presence_stats", "channel": "news", "id": 1}, "bad_request"),
        ({"op": "presence", "channel": "room.1", "cursor": "abc", "id": 1}, "bad_request"),
        ({"op": "presence", "channel": "room.1", "cursor": 5, "id": 1}, "bad_request"),
        ({"op": "presence", "channel": "room.1", "limit": 0, "id": 1}, "bad_request"),
        ({"op": "presence", "channel": "bad name", "id": 1}, "bad_request"),
        ({"op": "presence", "channel": "room.secret", "id": 1}, "forbidden"),  # not in its claim
        ({"op": "presence_stats", "channel": "@@replicas", "id": 1}, "bad_request"),
        # Not a Redis cursor (over 2^64 - 1, or a newline after the digits): was
        # "unavailable" with Redis' error text.
        ({"op": "presence", "channel": "room.1", "cursor": str(2**64), "id": 1}, "bad_request"),
        ({"op": "presence", "channel": "room.1", "cursor": "5\n", "id": 1}, "bad_request"),
    ],
)
async def test_bad_presence_requests_get_documented_errors(
    gateway_factory: GatewayFactory, payload: dict[str, Any], code: str
) -> None:
    gateway = gateway_factory(WITH_TOKENS)
    async with as_user(gateway, "eve", presence=["room.1"]) as ws:
        answer = await ask(ws, payload)
        assert (answer["op"], answer["code"], answer["id"]) == ("error", code, 1), answer
        assert await ask(ws, {"op": "ping", "id": 2}) == {"op": "pong", "id": 2}


async def test_join_frames_are_bounded_in_bytes_whatever_the_info(
    gateway_factory: GatewayFactory,
) -> None:
    """Members with an info claim near its 1 KiB limit: a join frame lists what fits in
    4 KiB of entries (here three), one frame a window, so a room's watchers get at most
    about 80 KiB a second of joins and leaves from a replica, not the 0.5 to 0.9 MB/s that
    100 such entries a frame made (a watcher that could not keep up fell 8 s behind)."""
    gateway = gateway_factory(WITH_TOKENS)
    info = {"bio": "x" * 1000}
    async with contextlib.AsyncExitStack() as stack:
        watcher = await stack.enter_async_context(as_user(gateway, "watch", "room.i"))
        await recv_json(watcher)
        await events(watcher, "join", 1, 5)
        started = time.monotonic()
        for n in range(20):
            ws = await stack.enter_async_context(as_user(gateway, f"u{n}", "room.i", info=info))
            await recv_json(ws)
        frames = await events(watcher, "join", 20, 10)
        took = time.monotonic() - started
    sizes = [len(",".join(json.dumps(m, separators=(",", ":")) for m in f)) for f in frames]
    assert all(size <= 4096 for size in sizes) and max(len(f) for f in frames) == 3, sizes
    assert sorted(m["user"] for f in frames for m in f) == sorted(f"u{n}" for n in range(20))
    assert took >= 0.1 * (len(frames) - 1), (took, len(frames))  # one frame a window


async def test_presence_reads_have_a_rate_of_their_own(gateway_factory: GatewayFactory) -> None:
    """A 40-byte request brings back up to GATEWAY_PRESENCE_PAGE members and costs the shared
    Redis a scan: GATEWAY_PRESENCE_READ_RATE a second per connection (here 2), ten times that
    at once; then `limit`, while other requests go on."""
    gateway = gateway_factory({**PRESENCE, "GATEWAY_PRESENCE_READ_RATE": "2"})
    async with client(f"{gateway.ws_url}?channels=room.1") as ws:
        await recv_json(ws)
        answers = []
        for n in range(21):  # 20 at once is the burst; the rate adds well under one more
            op = "presence" if n % 2 else "presence_stats"
            answers.append(await ask(ws, {"op": op, "channel": "room.1", "id": 10 + n}))
        refused = [a for a in answers if a["op"] == "error"]
        assert len(refused) == 1 and len(answers) - len(refused) == 20, answers
        assert (refused[0]["code"], refused[0]["message"]) == (
            "limit",
            "presence reads are limited to 2 a second",
        )
        assert await ask(ws, {"op": "ping", "id": 2}) == {"op": "pong", "id": 2}
        await asyncio.sleep(0.5)  # one more a half second later
        assert (await ask(ws, {"op": "presence_stats", "channel": "room.1", "id": 3}))["op"] == (
            "presence_stats"
        )


async def test_a_rate_below_a_tenth_still_allows_one_read(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory({**PRESENCE, "GATEWAY_PRESENCE_READ_RATE": "0.05"})
    async with client(f"{gateway.ws_url}?channels=room.1") as ws:
        await recv_json(ws)
        first = await ask(ws, {"op": "presence_stats", "channel": "room.1", "id": 1})
        second = await ask(ws, {"op": "presence_stats", "channel": "room.1", "id": 2})
        assert (first["op"], second.get("code")) == ("presence_stats", "limit")


async def test_nobody_reads_who_is_on_another_user_s_personal_channel(
    gateway_factory: GatewayFactory,
) -> None:
    """With presence on a pattern matching @* (anonymous clients may read `*` by default),
    anyone could list who was connected to another user's personal channel, with their
    info. Now only the user reads their own."""
    gateway = gateway_factory(
        {
            "GATEWAY_PRESENCE_CHANNELS": "@*,room.*",
            "GATEWAY_PERSONAL_CHANNELS": "on",
            "GATEWAY_JWT_SECRET": SECRET,
        }
    )
    async with (
        as_user(gateway, "alice", presence=["*"]) as alice,
        as_user(gateway, "mallory", presence=["*"]) as mallory,
    ):
        for ws in (alice, mallory):
            assert (await recv_json(ws))["op"] == "subscribed"  # its own personal channel
        own = await ask(alice, {"op": "presence_stats", "channel": "@alice", "id": 1})
        assert own["op"] == "presence_stats", own
        for op in ("presence", "presence_stats"):
            other = await ask(mallory, {"op": op, "channel": "@alice", "id": 2})
            assert (other["op"], other["code"]) == ("error", "forbidden"), other


def test_join_leave_without_presence_is_refused_at_start(gateway_factory: GatewayFactory) -> None:
    with pytest.raises(RuntimeError, match="join_leave_channels needs presence_channels"):
        gateway_factory({"GATEWAY_JOIN_LEAVE_CHANNELS": "room.*"})


async def test_an_oversized_info_claim_is_refused(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(WITH_TOKENS)
    status, body = await refused(f"{gateway.ws_url}?token={token(info='x' * 1100)}")
    assert status == 401 and "'info'" in body
    async with client(f"{gateway.ws_url}?token={token(info='x' * 1000)}"):
        pass

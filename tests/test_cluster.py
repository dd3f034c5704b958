"""The redis-cluster backplane on a real six-node Redis Cluster (three primaries, one replica
each): sharded pub/sub through two gateway replicas, a primary's failover, a resharding."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
from typing import Any

from redis.crc import key_slot

from publisher import Publisher
from publisher.history import HistoryPolicy
from tests.harness import (
    GatewayFactory,
    GatewayProcess,
    RedisClusterServers,
    RedisServer,
    async_wait_until,
    client,
    recv_json,
    request,
    wait_until,
)

FAST = {
    "GATEWAY_RECONNECT_MIN": "0.05",
    "GATEWAY_RECONNECT_MAX": "0.5",
    "GATEWAY_PROBE_INTERVAL": "1",  # how often the slot map is re-read anyway
    "GATEWAY_HISTORY_CHANNELS": "h.*",
}


def channels_on_every_primary(cluster: RedisClusterServers, prefix: str) -> dict[int, str]:
    """A channel name served by each primary: port -> channel."""
    found: dict[int, str] = {}
    for n in itertools.count():
        channel = f"{prefix}{n}"
        found.setdefault(cluster.owner("ws:" + channel).port, channel)
        if len(found) == len(cluster.primaries()):
            return found
    raise AssertionError("unreachable")


def shard_subscribers(node: RedisServer, channel: str) -> int:
    return int(node.command("PUBSUB", "SHARDNUMSUB", "ws:" + channel)[1])


def gateway_connections(node: RedisServer) -> int:
    """Pub/sub connections on ``node`` (a gateway's node links)."""
    clients = node.command("CLIENT", "LIST").splitlines()
    return sum(1 for line in clients if "ssub=" in line and " ssub=0 " not in line + " ")


async def subscribe_all(ws: Any, channels: list[str]) -> None:
    for channel in channels:
        reply = await request(ws, {"op": "subscribe", "channel": channel, "id": 1})
        assert reply["op"] == "subscribed", reply


async def test_channels_on_every_primary_reach_subscribers_on_both_replicas(
    cluster: RedisClusterServers, gateway_factory: GatewayFactory
) -> None:
    env = {**FAST, "GATEWAY_REDIS_URL": cluster.url, "GATEWAY_ANONYMOUS_PUBLISH": "*"}
    replicas = [gateway_factory(env), gateway_factory(env)]
    spread = channels_on_every_primary(cluster, "room")
    more = channels_on_every_primary(cluster, "feed")  # a second channel on each primary
    channels = [*spread.values(), *more.values()]
    with Publisher(cluster.url) as publisher:
        async with client(replicas[0].ws_url) as first, client(replicas[1].ws_url) as second:
            for ws in (first, second):
                await subscribe_all(ws, channels)
            for channel in channels:
                assert publisher.publish(channel, channel) == 2  # both replicas, one node
                for ws in (first, second):
                    message = await recv_json(ws)
                    assert (message["channel"], message["data"]) == (channel, channel)
            for port, channel in spread.items():
                node = next(n for n in cluster.nodes if n.port == port)
                assert shard_subscribers(node, channel) == 2
                # One connection per replica to each primary, whatever the channel count.
                assert gateway_connections(node) == 2
            for replica in replicas:
                assert replica.metric("wsgateway_backplane_node_connected") == 3
                assert replica.http("/readyz") == (200, "ready\n")
            # A client publishing through a replica: SPUBLISH from the gateway itself.
            reply = await request(
                first, {"op": "publish", "channel": channels[1], "data": "hi", "id": 3}
            )
            assert reply["op"] == "published", reply
            for ws in (first, second):
                assert (await recv_json(ws))["data"] == "hi"
            # A malformed envelope is counted and dropped; the next valid one is delivered.
            owner = cluster.owner("ws:" + channels[2])
            assert owner.command("SPUBLISH", "ws:" + channels[2], "not json") == 2
            assert publisher.publish(channels[2], "valid") == 2
            for ws in (first, second):
                assert (await recv_json(ws))["data"] == "valid"
            assert replicas[0].metric("wsgateway_messages_malformed_total") == 1
            # Reference counts hold: the last local subscriber gone, the replica leaves.
            await request(first, {"op": "unsubscribe", "channel": channels[0], "id": 2})
        node = cluster.owner("ws:" + channels[0])
        await async_wait_until(lambda: shard_subscribers(node, channels[0]) == 0)


async def test_a_primary_fails_over_and_delivery_resumes_with_nothing_lost(
    cluster: RedisClusterServers, gateway_factory: GatewayFactory
) -> None:
    env = {**FAST, "GATEWAY_REDIS_URL": cluster.url}
    gateway = gateway_factory(env)
    victim = cluster.owner("ws:h.orders")
    plain = next(
        f"live{n}" for n in itertools.count() if cluster.owner(f"ws:live{n}").port == victim.port
    )
    policy = HistoryPolicy(("h.*",))
    async with client(gateway.ws_url) as ws:
        await subscribe_all(ws, ["h.orders", plain])
        with Publisher(cluster.url, history=policy) as publisher:
            publisher.publish("h.orders", 0)
            assert (await recv_json(ws))["data"] == 0
            # Replication is asynchronous: a write the replica has not got yet is lost with
            # the primary (the history would restart in a new epoch, which test_history covers).
            replica = replica_of(cluster, victim)
            wait_until(lambda: replica.pipeline([("READONLY",), ("XLEN", STREAM)])[1] == 1)
            victim.kill()
            wait_until(lambda: gateway.http_status("/readyz") == 503, timeout=10)
            # The replica is promoted after cluster-node-timeout (2 s); the publisher keeps
            # trying meanwhile, as a service would.
            published = []
            for n in range(1, 6):
                while True:
                    try:
                        publisher.publish("h.orders", n)
                        break
                    except Exception:
                        await asyncio.sleep(0.2)
                published.append(n)
            wait_until(lambda: gateway.http_status("/readyz") == 200, timeout=20)
            got = [await recv_json(ws, timeout=10) for _ in published]
            assert [m["data"] for m in got] == published  # filled from the stream, in order
            assert [m["offset"] for m in got] == [2, 3, 4, 5, 6]
            publisher.publish(plain, "after")
            assert (await recv_json(ws))["data"] == "after"
    # The outage counted, whichever noticed it first: the node's connection, its probe or
    # the periodic re-read of the slot map (which, on a loaded machine, can be first).
    assert gateway.metric("wsgateway_backplane_reconnects_total") >= 1
    assert gateway.metric("wsgateway_backplane_outage_seconds_total") > 0


STREAM = "{ws:h.orders}:history"


def replica_of(cluster: RedisClusterServers, primary: RedisServer) -> RedisServer:
    primary_id = _node_id(primary)
    for line in primary.command("CLUSTER", "NODES").splitlines():
        fields = line.split()
        if fields[3] == primary_id:
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            return next(n for n in cluster.nodes if n.port == port)
    raise LookupError("no replica")


def _node_id(node: RedisServer) -> str:
    return str(node.command("CLUSTER", "MYID"))


async def test_a_resharded_slot_is_followed_without_losing_the_subscription(
    cluster: RedisClusterServers, gateway_factory: GatewayFactory
) -> None:
    env = {**FAST, "GATEWAY_REDIS_URL": cluster.url}
    gateway: GatewayProcess = gateway_factory(env)
    source, target = cluster.primaries()[:2]
    # redis-cli --cluster reshard moves the source's lowest slots first: take a channel there.
    lowest = min(
        int(start)
        for start, _, primary, *_ in source.command("CLUSTER", "SLOTS")
        if int(primary[1]) == source.port
    )
    channel = next(f"r{n}" for n in itertools.count() if key_slot(f"ws:r{n}".encode()) == lowest)
    async with client(gateway.ws_url) as ws:
        await subscribe_all(ws, [channel])
        with Publisher(cluster.url) as publisher:
            assert publisher.publish(channel, "before") == 1
            assert (await recv_json(ws))["data"] == "before"
            await asyncio.to_thread(
                subprocess.run,
                [
                    "redis-cli", "--cluster", "reshard", f"127.0.0.1:{source.port}",
                    "--cluster-from", _node_id(source), "--cluster-to", _node_id(target),
                    "--cluster-slots", "1", "--cluster-yes",
                ],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            assert cluster.owner("ws:" + channel).port == target.port
            await async_wait_until(lambda: shard_subscribers(target, channel) == 1, timeout=10)
            assert publisher.publish(channel, "after") == 1
            assert (await recv_json(ws))["data"] == "after"


async def test_a_subscribe_answered_moved_is_placed_on_the_new_owner(
    cluster: RedisClusterServers, gateway_factory: GatewayFactory
) -> None:
    """The replica's slot map is stale (the map is re-read only every minute here, and the
    slot moved with CLUSTER SETSLOT, which tells no subscriber): its SSUBSCRIBE is answered
    MOVED, the map is re-read and the channel subscribed where it lives now."""
    env = {**FAST, "GATEWAY_REDIS_URL": cluster.url, "GATEWAY_PROBE_INTERVAL": "60"}
    gateway: GatewayProcess = gateway_factory(env)
    source, target = cluster.primaries()[:2]
    channel = next(
        f"moved{n}" for n in itertools.count() if cluster.owner(f"ws:moved{n}").port == source.port
    )
    slot = key_slot(f"ws:{channel}".encode())
    async with client(gateway.ws_url) as ws:
        # The replica has read the slot map and holds a connection to the source.
        warm = next(
            f"warm{n}"
            for n in itertools.count()
            if cluster.owner(f"ws:warm{n}").port == source.port
        )
        await subscribe_all(ws, [warm])
        # An empty slot moves without MIGRATE: the protocol of redis-cli --cluster reshard.
        target.command("CLUSTER", "SETSLOT", str(slot), "IMPORTING", _node_id(source))
        source.command("CLUSTER", "SETSLOT", str(slot), "MIGRATING", _node_id(target))
        for node in (target, source, *cluster.primaries()[2:]):
            node.command("CLUSTER", "SETSLOT", str(slot), "NODE", _node_id(target))
        assert cluster.owner(f"ws:{channel}").port == target.port
        await subscribe_all(ws, [channel])
        assert "answered MOVED" in gateway.logs()  # the path taken: not a periodic re-read
        assert shard_subscribers(target, channel) == 1
        assert shard_subscribers(source, channel) == 0
        with Publisher(cluster.url) as publisher:
            assert publisher.publish(channel, "on the new owner") == 1
            assert (await recv_json(ws))["data"] == "on the new owner"


async def test_hash_tags_put_related_channels_and_their_history_on_one_node(
    cluster: RedisClusterServers, gateway_factory: GatewayFactory
) -> None:
    gateway = gateway_factory({**FAST, "GATEWAY_REDIS_URL": cluster.url})
    related = ["h.{room7}.chat", "h.{room7}.typing", "{room7}.presence"]
    assert len({cluster.owner("ws:" + channel).port for channel in related}) == 1
    policy = HistoryPolicy(("h.*",))
    async with client(gateway.ws_url) as ws:
        await subscribe_all(ws, related)
        with Publisher(cluster.url, history=policy) as publisher:
            for channel in related:
                assert publisher.publish(channel, channel) == 1
                message = await recv_json(ws)
                assert (message["channel"], message["data"]) == (channel, channel)
                assert ("offset" in message) == channel.startswith("h.")
        node = cluster.owner("ws:" + related[0])
        # One SSUBSCRIBE per slot: the three channels share one slot and one connection.
        assert gateway_connections(node) == 1
        stream = node.command("XRANGE", "ws:h.{room7}.chat:history", "-", "+")
        assert len(stream) == 1


async def test_a_silent_node_connection_is_detected_and_replaced(
    cluster: RedisClusterServers, gateway_factory: GatewayFactory
) -> None:
    """A node that stops answering (CLIENT PAUSE WRITE: connections open, no SPUBLISH served) is
    found by the per-node probe, not by a socket timeout, and its channels re-subscribed."""
    gateway = gateway_factory(
        {
            **FAST,
            "GATEWAY_REDIS_URL": cluster.url,
            "GATEWAY_PROBE_INTERVAL": "0.3",
            "GATEWAY_PROBE_TIMEOUT": "0.5",
        }
    )
    node = cluster.owner("ws:quiet")
    async with client(gateway.ws_url) as ws:
        await subscribe_all(ws, ["quiet"])
        # Paused for longer than the test waits: the node comes back when the test says so.
        node.command("CLIENT", "PAUSE", "60000", "WRITE")  # SPUBLISH, the probe, waits too
        try:
            await asyncio.to_thread(wait_until, lambda: "is silent" in gateway.logs(), 10)

            # Not ready, naming the node. A replacement connection counts as up until its own
            # probe times out (0.8 s here), so readiness may flicker to 200 in between: wait
            # for the answer rather than read it once.
            def named_down() -> bool:
                status, body = gateway.http("/readyz")
                return status == 503 and f"127.0.0.1:{node.port} down" in body

            await asyncio.to_thread(wait_until, named_down, 10)
        finally:
            node.command("CLIENT", "UNPAUSE")
        await asyncio.to_thread(wait_until, lambda: gateway.http_status("/readyz") == 200, 20)
        with Publisher(cluster.url) as publisher:
            assert publisher.publish("quiet", "after") == 1
        assert (await recv_json(ws))["data"] == "after"

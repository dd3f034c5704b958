"""Users: personal channels (``@<sub>``, nobody else's), server-side subscriptions from the
token's ``subs`` claim, and the per-user connection limit of a replica."""

from __future__ import annotations

import pytest
from websockets.exceptions import InvalidStatus

from tests.harness import GatewayFactory, async_wait_until, client, recv_json, request
from tests.test_security import SECRET, refused, token


async def test_a_personal_channel_is_its_user_s_alone(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory({"GATEWAY_JWT_SECRET": SECRET, "GATEWAY_PERSONAL_CHANNELS": "on"})
    alice = token(sub="alice", channels=["*"])
    service = token(sub="bob", channels=["*"], publish=["@*"])  # may publish to anyone's
    async with (
        client(f"{gateway.ws_url}?token={alice}") as ws,
        client(f"{gateway.ws_url}?token={service}") as bob,
    ):
        # Put on at connect without asking, each on their own.
        assert await recv_json(ws) == {"op": "subscribed", "channel": "@alice"}
        assert await recv_json(bob) == {"op": "subscribed", "channel": "@bob"}
        # "*" in bob's channels does not reach alice's personal channel.
        denied = await request(bob, {"op": "subscribe", "channel": "@alice", "id": 1})
        assert (denied["op"], denied["code"]) == ("error", "forbidden")
        assert await request(
            bob, {"op": "publish", "channel": "@alice", "data": "for you", "id": 2}
        ) == {"op": "published", "id": 2}
        assert (await recv_json(ws))["data"] == "for you"


async def test_personal_channels_are_reserved_even_when_not_subscribed_at_connect(
    gateway_factory: GatewayFactory,
) -> None:
    anonymous = gateway_factory()  # GATEWAY_ANONYMOUS_CHANNELS=*
    async with client(anonymous.ws_url) as ws:
        answer = await request(ws, {"op": "subscribe", "channel": "@alice", "id": 1})
        assert answer["code"] == "forbidden"
    with_tokens = gateway_factory({"GATEWAY_JWT_SECRET": SECRET})  # personal channels off
    async with client(f"{with_tokens.ws_url}?token={token(sub='alice', channels=[])}") as ws:
        # Not put on it at connect, but it may ask for its own.
        assert (await request(ws, {"op": "subscribe", "channel": "@alice", "id": 1}))["op"] == (
            "subscribed"
        )


async def test_the_subs_claim_subscribes_at_connect_beyond_the_channel_patterns(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory({"GATEWAY_JWT_SECRET": SECRET})
    room = token(channels=[], subs=["room.7", "room.7.typing"])
    async with client(f"{gateway.ws_url}?token={room}&channels=room.7") as ws:
        subscribed = [await recv_json(ws) for _ in range(2)]
        assert [f["channel"] for f in subscribed] == ["room.7", "room.7.typing"]
        other = await request(ws, {"op": "subscribe", "channel": "room.8", "id": 1})
        assert other["code"] == "forbidden"
        # A refreshed token without the sub takes the channel away.
        await ws.send(f'{{"op":"refresh","token":"{token(channels=[], subs=["room.7"])}"}}')
        assert await recv_json(ws) == {
            "op": "unsubscribed",
            "channel": "room.7.typing",
            "reason": "forbidden",
        }


async def test_a_single_sub_is_a_list_of_one(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory({"GATEWAY_JWT_SECRET": SECRET})
    async with client(f"{gateway.ws_url}?token={token(subs='room.7')}") as ws:  # like channels
        assert (await recv_json(ws))["channel"] == "room.7"


@pytest.mark.parametrize("subs", [["has space"], [7], ["x" * 129]])
async def test_a_token_with_bad_subs_is_refused(
    gateway_factory: GatewayFactory, subs: object
) -> None:
    gateway = gateway_factory({"GATEWAY_JWT_SECRET": SECRET})
    status, body = await refused(f"{gateway.ws_url}?token={token(subs=subs)}")
    assert status == 401 and "'subs'" in body


async def test_a_user_may_hold_only_so_many_connections_on_a_replica(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory(
        {"GATEWAY_JWT_SECRET": SECRET, "GATEWAY_MAX_CONNECTIONS_PER_USER": "2"}
    )
    url = f"{gateway.ws_url}?token={token(sub='alice')}"
    async with client(url) as first, client(url):
        with pytest.raises(InvalidStatus) as third:
            async with client(url):
                pass
        assert third.value.response.status_code == 429
        assert b"too many connections for this user" in third.value.response.body
        async with client(f"{gateway.ws_url}?token={token(sub='bob')}") as bob:  # others may
            assert (await request(bob, {"op": "ping", "id": 1}))["op"] == "pong"
        await first.close()
        # A slot is free once the replica has seen one of hers go (bob's has gone too).
        await async_wait_until(lambda: gateway.metric("wsgateway_connections_open") == 1)
        async with client(url) as again:
            assert (await request(again, {"op": "ping", "id": 1}))["op"] == "pong"
    assert gateway.metric("wsgateway_handshakes_refused_total", reason="user_limit") == 1

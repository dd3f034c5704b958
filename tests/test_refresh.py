"""In-band token refresh: ``{"op":"refresh","token":...}`` gives a connection a new expiry and
new rights without reconnecting; a refused one changes nothing; the Python client refreshes
before its token expires when its token is a callable."""

from __future__ import annotations

import asyncio
import time

import pytest
from websockets.exceptions import ConnectionClosed

from gateway.client import Client, Message
from tests.harness import GatewayFactory, GatewayProcess, client, recv_json, request
from tests.test_security import SECRET, token, token_of_length


@pytest.fixture
def gateway(gateway_factory: GatewayFactory) -> GatewayProcess:
    return gateway_factory({"GATEWAY_JWT_SECRET": SECRET})


async def test_a_refresh_keeps_the_connection_open_past_the_first_token(
    gateway: GatewayProcess,
) -> None:
    first = token(exp=int(time.time()) + 2, channels=["chat"])
    async with client(f"{gateway.ws_url}?token={first}&channels=chat") as ws:
        assert (await recv_json(ws))["op"] == "subscribed"
        later = int(time.time()) + 60
        fresh = token(exp=later, channels=["chat"])
        answer = await request(ws, {"op": "refresh", "token": fresh, "id": 1})
        assert answer == {"op": "refreshed", "id": 1, "exp": later}
        await asyncio.sleep(3)  # past the first token's exp: no 4001
        assert (await request(ws, {"op": "ping", "id": 2}))["op"] == "pong"
        await ws.send('{"op":"publish","channel":"chat","data":"still here"}')
        frames = [await recv_json(ws), await recv_json(ws)]
        assert {"op": "published"} in frames
        assert any(f.get("data") == "still here" for f in frames)
    assert gateway.metric("wsgateway_token_refreshes_total", result="ok") == 1


async def test_a_narrower_token_unsubscribes_what_it_no_longer_allows(
    gateway: GatewayProcess,
) -> None:
    wide = token(channels=["news", "user.alice.*"], publish=["chat"])
    async with client(f"{gateway.ws_url}?token={wide}&channels=news,user.alice.inbox") as ws:
        assert [(await recv_json(ws))["channel"] for _ in range(2)] == ["news", "user.alice.inbox"]
        narrow = token(channels=["news"], publish=[])
        await ws.send(f'{{"op":"refresh","token":"{narrow}","id":7}}')
        assert await recv_json(ws) == {
            "op": "unsubscribed",
            "channel": "user.alice.inbox",
            "reason": "forbidden",
        }
        assert (await recv_json(ws))["op"] == "refreshed"
        again = await request(ws, {"op": "subscribe", "channel": "user.alice.inbox", "id": 8})
        assert (again["op"], again["code"]) == ("error", "forbidden")
        publish = await request(ws, {"op": "publish", "channel": "chat", "data": 1, "id": 9})
        assert publish["code"] == "forbidden"  # publish rights come from the new token too
        kept = await request(ws, {"op": "subscribe", "channel": "news", "id": 10})
        assert kept["op"] == "subscribed"


@pytest.mark.parametrize(
    ("payload", "code", "why"),
    [
        ({"token": token(sub="bob")}, "forbidden", "another subject"),
        ({"token": token(exp=int(time.time()) - 10)}, "forbidden", "token expired"),
        ({"token": "garbage"}, "forbidden", "invalid token"),
        ({"token": token(key="another-secret-another-secret-0123")}, "forbidden", "invalid token"),
        ({"token": ""}, "bad_request", "must not be empty"),
        ({"token": 123}, "bad_request", "Expected `str`"),
        ({}, "bad_request", "missing required field `token`"),
    ],
)
async def test_a_refused_refresh_changes_nothing(
    gateway: GatewayProcess, payload: dict[str, object], code: str, why: str
) -> None:
    """The answer says why; the connection keeps its rights and closes 4001 when its own
    token expires, as if nothing had been asked."""
    short = token(exp=int(time.time()) + 3)
    async with client(f"{gateway.ws_url}?token={short}&channels=news") as ws:
        assert (await recv_json(ws))["op"] == "subscribed"
        answer = await request(ws, {"op": "refresh", "id": 3, **payload})
        assert (answer["op"], answer["id"], answer["code"]) == ("error", 3, code)
        assert why in answer["message"], answer
        assert SECRET not in answer["message"]
        assert (await request(ws, {"op": "subscribe", "channel": "news", "id": 4}))["op"] == (
            "subscribed"
        )
        with pytest.raises(ConnectionClosed):
            await recv_json(ws, timeout=6)
        assert ws.close_code == 4001
    refused = 1 if code == "forbidden" else 0  # a malformed request never reaches the check
    assert gateway.metric("wsgateway_token_refreshes_total", result="refused") == refused


async def test_an_anonymous_connection_has_nothing_to_refresh(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory()
    async with client(gateway.ws_url) as ws:
        answer = await request(ws, {"op": "refresh", "token": token(), "id": 1})
        assert (answer["code"], answer["message"]) == (
            "bad_request",
            "this connection has no token to refresh",
        )
        assert (await request(ws, {"op": "ping", "id": 2}))["op"] == "pong"


async def test_the_client_refreshes_before_its_token_expires(gateway: GatewayProcess) -> None:
    """Tokens that live 3 s, refreshed 1.5 s before they expire: one connection for 8 s."""
    issued: list[str] = []

    def fresh() -> str:
        issued.append(token(exp=int(time.time()) + 3, channels=["chat"], publish=["chat"]))
        return issued[-1]

    async with Client(gateway.ws_url, ["chat"], token=fresh, refresh_before=1.5) as chat:
        await asyncio.wait_for(chat.connected.wait(), 10)
        await asyncio.sleep(8)
        await chat.publish("chat", "after three tokens")
        event = await asyncio.wait_for(anext(aiter(chat)), 5)
        assert isinstance(event, Message) and event.data == "after three tokens"
        assert chat.connects == 1  # never closed with 4001, never reconnected
    assert len(issued) >= 4  # the first token and at least three refreshes
    assert gateway.metric("wsgateway_token_refreshes_total", result="ok") >= 3


async def test_refreshes_are_a_second_apart_and_tokens_at_most_max_token_bytes(
    gateway: GatewayProcess,
) -> None:
    """Each refresh decodes a token: one a second at most (`limit` sooner, without decoding
    it), and a token over GATEWAY_MAX_TOKEN_BYTES (8192) is refused unread."""
    async with client(f"{gateway.ws_url}?token={token()}") as ws:
        exact = token_of_length(8192)
        assert (await request(ws, {"op": "refresh", "token": exact, "id": 1}))["op"] == "refreshed"
        sooner = await request(ws, {"op": "refresh", "token": token(), "id": 2})
        assert (sooner["code"], sooner["message"]) == ("limit", "at most one refresh every 1 s")
        await asyncio.sleep(1.0)
        over = await request(ws, {"op": "refresh", "token": token_of_length(8193), "id": 3})
        assert (over["code"], over["message"]) == (
            "forbidden",
            "refresh refused: token over 8192 bytes",
        )
    assert gateway.metric("wsgateway_token_refreshes_total", result="ok") == 1
    assert gateway.metric("wsgateway_token_refreshes_total", result="refused") == 1


async def test_three_refused_refreshes_in_a_row_close_the_connection(
    gateway: GatewayProcess,
) -> None:
    forged = token(key="another-secret-another-secret-0123")
    async with client(f"{gateway.ws_url}?token={token()}") as ws:
        for attempt in range(5):  # refused, refused, accepted: the count starts again
            await asyncio.sleep(1.0)
            good = attempt == 2
            answer = await request(ws, {"op": "refresh", "token": token() if good else forged})
            assert answer["op"] == ("refreshed" if good else "error"), answer
        await asyncio.sleep(1.0)
        third = await request(ws, {"op": "refresh", "token": forged, "id": 9})
        assert (third["id"], third["code"]) == (9, "forbidden")  # told why, then closed
        with pytest.raises(ConnectionClosed):
            await recv_json(ws)
        assert (ws.close_code, ws.close_reason) == (1008, "refreshes refused")
    closed = gateway.metric(
        "wsgateway_connections_closed_total", websocket_close_code="1008", reason="refresh"
    )
    assert closed == 1

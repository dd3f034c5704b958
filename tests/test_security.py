"""Who may connect, subscribe and publish: JWT (HS256, RS256, ES256), origins, and secrets."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.harness import GatewayFactory, GatewayProcess, client, expect_silence, recv_json, request

SECRET = "correct-horse-battery-staple-0123456789"


def token(key: Any = SECRET, algorithm: str = "HS256", **claims: Any) -> str:
    body = {
        "sub": "alice",
        "exp": int(time.time()) + 3600,
        "channels": ["news", "user.alice.*"],
        "publish": ["chat"],
        **claims,
    }
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm=algorithm)


def token_of_length(length: int, **claims: Any) -> str:
    """A valid token of exactly ``length`` characters (padded with a claim of its own)."""
    for extra in range(4):  # base64 cannot make every length from every padding
        for pad in range(max(0, length * 3 // 4 - 300), length):
            made = token(pad="x" * pad, jti="j" * extra, **claims)
            if len(made) == length:
                return made
            if len(made) > length:
                break
    raise AssertionError(f"no token of {length} characters")


def tampered(good: str) -> str:
    header, _, signature = good.split(".")
    claims = {"sub": "alice", "exp": int(time.time()) + 3600, "channels": ["*"]}
    return ".".join((header, b64(json.dumps(claims).encode()), signature))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_signed_with(secret: bytes, claims: dict[str, Any]) -> str:
    """An HS256 token made by hand, as an attacker would make one (PyJWT refuses to)."""
    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(json.dumps(claims).encode())
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


async def refused(url: str, **kwargs: Any) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as caught:
        async with client(url, **kwargs):
            pass
    response = caught.value.response
    return response.status_code, response.body.decode()


@pytest.fixture
def hs_gateway(gateway_factory: GatewayFactory) -> GatewayProcess:
    return gateway_factory({"GATEWAY_JWT_SECRET": SECRET})


@pytest.mark.parametrize(
    ("bad_token", "why"),
    [
        (None, "a token is required"),
        ("", "a token is required"),
        ("garbage", "invalid token"),
        (token(key="another-secret-another-secret-0123"), "invalid token"),
        (token(exp=int(time.time()) - 10), "token expired"),
        (token(exp=None), "invalid token"),
        (token(sub=None), "invalid token"),
        (token(sub=""), "invalid token"),
        (token() + "x", "invalid token"),  # signature tampered with
        (tampered(token()), "invalid token"),  # claims changed, signature kept
        # A user no service could name in a control request (at most 256 characters).
        (token(sub="u" * 257), "'sub' must be a string of 1 to 256"),
        # Not Unicode: the first presence subscribe failed 1011, and 'info' made HTTP 500.
        (token(sub="\ud800"), "'sub' is not valid Unicode"),
        (token(info={"name": "\udfff"}), "'info' is not valid Unicode"),
        (token(channels={"not": "a list"}), "invalid token"),
        (
            jwt.encode({"sub": "alice", "exp": int(time.time()) + 3600}, "", algorithm="none"),
            "invalid token",
        ),
    ],
)
async def test_missing_or_bad_tokens_are_refused_with_401(
    hs_gateway: GatewayProcess, bad_token: str | None, why: str
) -> None:
    url = hs_gateway.ws_url if bad_token is None else f"{hs_gateway.ws_url}?token={bad_token}"
    status, body = await refused(url)
    assert status == 401
    assert why in body
    assert SECRET not in body


async def test_tokens_up_to_the_bounds_are_accepted_beyond_refused_unread(
    gateway_factory: GatewayFactory,
) -> None:
    """A token of GATEWAY_MAX_TOKEN_BYTES is usable, one character more is refused before
    it is decoded (which costs 30-50 us per KB before the signature is seen); the longest
    sub (256 characters) is usable. (Here 4096: at the default, 8192, a request line or
    header line that long is refused by the WebSocket library first, 414 or 400.)"""
    gateway = gateway_factory({"GATEWAY_JWT_SECRET": SECRET, "GATEWAY_MAX_TOKEN_BYTES": "4096"})
    for good in (token_of_length(4096), token(sub="u" * 256)):
        async with client(f"{gateway.ws_url}?token={good}") as ws:
            assert (await request(ws, {"op": "ping", "id": 1}))["op"] == "pong"
    status, body = await refused(f"{gateway.ws_url}?token={token_of_length(4097)}")
    assert (status, body) == (401, "token over 4096 bytes\n")


async def test_token_by_query_or_bearer_header_and_claims_decide_access(
    hs_gateway: GatewayProcess,
) -> None:
    good = token()
    async with (
        client(f"{hs_gateway.ws_url}?token={good}&channels=news") as by_query,
        client(
            hs_gateway.ws_url, additional_headers={"Authorization": f"Bearer {good}"}
        ) as by_header,
    ):
        assert await recv_json(by_query) == {"op": "subscribed", "channel": "news"}
        assert (
            await request(by_header, {"op": "subscribe", "channel": "user.alice.inbox", "id": 1})
        )["op"] == "subscribed"
        for channel in ("sports", "user.bob.inbox"):
            reply = await request(by_header, {"op": "subscribe", "channel": channel, "id": 2})
            assert (reply["op"], reply["code"], reply["id"]) == ("error", "forbidden", 2)
        denied = await request(by_header, {"op": "publish", "channel": "news", "data": 1, "id": 3})
        assert denied["code"] == "forbidden"
        # The token allows publishing to "chat"; nobody listens there, but it is accepted.
        assert await request(
            by_header, {"op": "publish", "channel": "chat", "data": 1, "id": 4}
        ) == {"op": "published", "id": 4}


async def test_connection_closes_with_4001_when_the_token_expires(
    hs_gateway: GatewayProcess,
) -> None:
    short = token(exp=int(time.time()) + 2)
    async with client(f"{hs_gateway.ws_url}?token={short}") as ws:
        assert (await request(ws, {"op": "ping", "id": 1}))["op"] == "pong"
        with pytest.raises(ConnectionClosed):
            await recv_json(ws, timeout=6)
        assert ws.close_code == 4001
        assert ws.close_reason == "token expired"


def public_key_file(tmp_path: Path, private_key: Any) -> Path:
    path = tmp_path / "jwt.pub.pem"
    path.write_bytes(
        private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


@pytest.mark.parametrize(
    ("algorithm", "make_key"),
    [
        ("RS256", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("ES256", lambda: ec.generate_private_key(ec.SECP256R1())),
    ],
)
async def test_public_key_tokens(
    gateway_factory: GatewayFactory, tmp_path: Path, algorithm: str, make_key: Any
) -> None:
    key = make_key()
    pem = public_key_file(tmp_path, key)
    gateway = gateway_factory({"GATEWAY_JWT_PUBLIC_KEY_FILE": str(pem)})
    async with client(f"{gateway.ws_url}?token={token(key, algorithm)}&channels=news") as ws:
        assert (await recv_json(ws))["op"] == "subscribed"
    assert (await refused(f"{gateway.ws_url}?token={token(make_key(), algorithm)}"))[0] == 401
    # Algorithm confusion: an HS256 token signed with the (public) key file as its secret.
    confused = hs256_signed_with(
        pem.read_bytes(), {"sub": "mallory", "exp": int(time.time()) + 60, "channels": ["*"]}
    )
    assert (await refused(f"{gateway.ws_url}?token={confused}"))[0] == 401
    assert (await refused(gateway.ws_url))[0] == 401


async def test_origin_allow_list(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(
        {"GATEWAY_ALLOWED_ORIGINS": r"https://app.example.com, re:https://[a-z]+\.example\.org"}
    )
    for origin in ("https://app.example.com", "https://eu.example.org"):
        async with client(gateway.ws_url, origin=origin) as ws:
            assert (await request(ws, {"op": "ping"}))["op"] == "pong"
    async with client(gateway.ws_url) as ws:  # no Origin header: not a browser
        assert (await request(ws, {"op": "ping"}))["op"] == "pong"
    for origin in (
        "https://evil.example.com",
        "https://app.example.com.evil.io",
        "http://app.example.com",
        "https://x.example.org.evil.io",
    ):
        status, _ = await refused(gateway.ws_url, origin=origin)
        assert status == 403, origin


def test_secrets_stay_out_of_logs_help_and_errors(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    redis_password_url = "redis://:hunter2-redis-password@127.0.0.1:1/0"
    gateway = gateway_factory(
        {"GATEWAY_JWT_SECRET": SECRET, "GATEWAY_REDIS_URL": redis_password_url},
        wait_ready=False,
    )

    async def attempts() -> None:
        await refused(f"{gateway.ws_url}?token={token(key='wrong-secret-wrong-secret-012345')}")
        await refused(f"{gateway.ws_url}?token={token(exp=int(time.time()) - 5)}")

    asyncio.run(attempts())
    gateway.stop()
    logs = gateway.logs()
    assert "cannot reach Redis" in logs  # it did log about Redis...
    assert "hunter2" not in logs  # ...without the password
    assert SECRET not in logs
    help_text = subprocess.run(
        [sys.executable, "-m", "gateway", "--help"],
        capture_output=True,
        text=True,
        env={
            "GATEWAY_JWT_SECRET": SECRET,
            "GATEWAY_REDIS_URL": redis_password_url,
            "PATH": "/usr/bin:/bin",
        },
        timeout=30,
    ).stdout
    assert "--jwt-secret" in help_text
    assert SECRET not in help_text and "hunter2" not in help_text


async def test_anonymous_clients_cannot_publish_by_default(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory()
    async with client(gateway.ws_url + "?channels=news") as ws:
        await recv_json(ws)
        reply = await request(ws, {"op": "publish", "channel": "news", "data": 1, "id": 1})
        assert reply["code"] == "forbidden"
        await expect_silence(ws)


async def test_two_tokens_are_a_bad_request(hs_gateway: GatewayProcess) -> None:
    header = {"Authorization": f"Bearer {token()}"}
    for url, headers in (
        (f"{hs_gateway.ws_url}?token={token()}&token={token()}", None),
        (hs_gateway.ws_url, [("Authorization", f"Bearer {token()}")] * 2),
        # One in the query string and one in the header: neither wins.
        (f"{hs_gateway.ws_url}?token={token()}", [("Authorization", f"Bearer {token()}")]),
    ):
        status, body = await refused(url, additional_headers=headers)
        assert (status, body) == (400, "more than one token\n")
    async with client(hs_gateway.ws_url, additional_headers=header) as ws:
        assert (await request(ws, {"op": "ping"}))["op"] == "pong"

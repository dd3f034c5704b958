"""Small pure rules: access patterns, JWT claims, backoff, rate limit, log throttling."""

from __future__ import annotations

import random
import time

import jwt
import pytest

from gateway.access import Access, personal_channel
from gateway.auth import Authenticator, AuthError, Identity, bearer_token
from gateway.backoff import full_jitter
from gateway.ratelimit import TokenBucket
from gateway.throttle import Throttle


def test_access_patterns() -> None:
    access = Access(subscribe=("news", "prices.*"), publish=("chat:*",))
    assert access.can_subscribe("news")
    assert access.can_subscribe("prices.eur")
    assert not access.can_subscribe("prices")
    assert not access.can_subscribe("News")  # case-sensitive
    assert access.can_publish("chat:lobby")
    assert not access.can_publish("news")
    assert not Access(subscribe=()).can_subscribe("news")


def test_full_jitter_stays_under_the_growing_cap() -> None:
    rng = random.Random(7)
    for attempt in range(100):
        delay = full_jitter(attempt, 0.1, 10.0, rng)
        assert 0.0 <= delay <= min(10.0, 0.1 * 2**attempt)
    delays = [full_jitter(20, 0.1, 10.0, rng) for _ in range(1000)]
    assert max(delays) > 9.0 and min(delays) < 1.0  # spread over the whole window


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=10, burst=10, now=0.0)
    assert all(bucket.take(0.0) for _ in range(10))
    assert not bucket.take(0.0)
    assert bucket.take(0.1)  # one token back after 1/rate seconds
    assert not bucket.take(0.1)
    assert all(bucket.take(100.0) for _ in range(10))  # refills up to the burst only
    assert not bucket.take(100.0)


def test_throttle_lets_one_line_an_interval_through_and_counts_the_rest() -> None:
    throttle = Throttle(1.0)
    assert throttle.ready(0.0)
    assert not throttle.ready(0.5) and not throttle.ready(0.9)
    assert throttle.take_suppressed() == 2
    assert throttle.ready(1.0)
    assert throttle.take_suppressed() == 0


SECRET = "s" * 32


def hs_token(**claims: object) -> str:
    body = {"sub": "alice", "exp": int(time.time()) + 3600, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, SECRET, algorithm="HS256")


def test_authenticator_without_keys_is_anonymous() -> None:
    anonymous = Access(subscribe=("public.*",))
    auth = Authenticator(anonymous=anonymous)
    assert not auth.required
    assert auth.authenticate(None) == Identity(None, anonymous)
    assert auth.authenticate("whatever") == Identity(None, anonymous)


def test_authenticator_reads_claims() -> None:
    auth = Authenticator(secret=SECRET, anonymous=Access(subscribe=("*",)))
    identity = auth.authenticate(hs_token(channels=["a.*"], publish="chat"))
    assert identity.subject == "alice"
    own = frozenset({"@alice"})  # the user's personal channel is always theirs
    assert identity.access == Access(
        subscribe=("a.*",), publish=("chat",), granted=own, own="@alice"
    )
    assert identity.expires_at is not None and identity.expires_at > time.time()
    # No channels claim: nothing, not the anonymous patterns.
    assert auth.authenticate(hs_token()).access == Access(
        subscribe=(), publish=(), granted=own, own="@alice"
    )
    # subs: channels granted by name, made at connect.
    with_subs = auth.authenticate(hs_token(subs=["room.7"]))
    assert with_subs.subs == ("room.7",)
    assert with_subs.access.granted == own | {"room.7"}


def test_personal_channels_and_granted_names() -> None:
    assert personal_channel("alice") == "@alice"
    assert personal_channel(None) is None
    assert personal_channel("has space") is None  # not a channel name: no personal channel
    assert personal_channel("x" * 127) == "@" + "x" * 127
    assert personal_channel("x" * 128) is None
    everything = Access(subscribe=("*",), granted=frozenset({"@alice", "room.7"}))
    assert everything.can_subscribe("@alice") and everything.can_subscribe("room.7")
    assert not everything.can_subscribe("@bob")  # "*" never reaches another's
    assert everything.can_subscribe("news")
    assert Access(subscribe=(), granted=frozenset({"room.7"})).can_subscribe("room.7")
    # Presence: a personal channel's is its user's alone, whatever the patterns.
    reader = Access(subscribe=(), presence=("*",), own="@alice", granted=frozenset({"@bob"}))
    assert reader.can_read_presence("@alice") and reader.can_read_presence("room.7")
    assert not reader.can_read_presence("@bob") and not reader.can_read_presence("@@control")
    assert not Access(subscribe=(), presence=("*",)).can_read_presence("@alice")  # anonymous


def test_a_refresh_must_name_the_same_subject() -> None:
    auth = Authenticator(secret=SECRET, anonymous=Access(subscribe=("*",)))
    assert auth.refresh("alice", hs_token(channels=["x"])).access.subscribe == ("x",)
    with pytest.raises(AuthError, match="another subject"):
        auth.refresh("bob", hs_token())
    with pytest.raises(AuthError, match="invalid token"):
        auth.refresh("alice", "garbage")


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (None, "a token is required"),
        (hs_token(exp=int(time.time()) - 1), "token expired"),
        (hs_token(exp=None), "invalid token"),
        (hs_token(sub=None), "invalid token"),
        (hs_token(sub=5), "invalid token"),
        (hs_token(channels=[1, 2]), "'channels' must be a list"),
    ],
)
def test_authenticator_refusals(token: str | None, message: str) -> None:
    auth = Authenticator(secret=SECRET, anonymous=Access(subscribe=()))
    with pytest.raises(AuthError, match=message):
        auth.authenticate(token)


def test_audience_and_issuer_when_configured() -> None:
    auth = Authenticator(secret=SECRET, audience="gw", issuer="idp", anonymous=Access(()))
    assert auth.authenticate(hs_token(aud="gw", iss="idp")).subject == "alice"
    for claims in ({"aud": "gw", "iss": "someone-else"}, {"aud": "other", "iss": "idp"}, {}):
        with pytest.raises(AuthError, match="invalid token"):
            auth.authenticate(hs_token(**claims))


def test_bearer_header_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc  ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer") is None
    assert bearer_token(None) is None

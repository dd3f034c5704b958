"""The adversarial suite: attacks on a real gateway process, each beside a canary.

Every test starts a real ``wsgateway`` (and, where it matters, a real ``redis-server``), runs
one hostile client from ``bench.attacks`` in a process of its own, and a well-behaved canary
(``bench.canary``) in another: the canary publishes numbered messages on its channel, pings,
and opens a new connection every second. Each test asserts the bound the attack tries to
break (the gateway's RSS from ``/proc``, its descriptors, what its metrics counted) and that
the canary lost nothing and kept answering. The bounds are those of docs/limits.md; the
latency figures are generous guards, the real ones come from ``python -m bench.soak``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import GatewayFactory, GatewayProcess, RedisServer
from tests.siege import Sampler, attack, canary

pytestmark = pytest.mark.attack

#: How long each attack runs, and the canary at least (it publishes 20 messages a second;
#: assert_canary_unharmed wants more than 50 of them).
ATTACK_SECONDS = 10.0
CANARY_SECONDS = 5.0
#: The canary's ping round trip (ms) at the 99th percentile, at most: 100 ms while clients
#: flood frames (the issue's guard), twice that for attacks that make the replica accept or
#: read megabytes at a time on this 2-core machine (measured: 30 to 80 ms). Generous guards:
#: the real figures are in docs/faults.md and from bench.soak.
RTT_P99_MS = 200.0
FLOOD_RTT_P99_MS = 100.0
#: A new connection's p99 (ms): under a second, because a dropped SYN alone costs a second
#: (the kernel's first retransmission timeout), so a connection faster than that was never
#: dropped. Measured 20 to 660 ms (the silent-sockets attack keeps the accept queue busy).
CONNECT_P99_MS = 1000.0


def siege(
    gateway: GatewayProcess,
    name: str,
    *,
    redis_url: str | None = None,
    seconds: float = ATTACK_SECONDS,
    during: Any = None,
    settle: float = 1.5,
    canary_url: str | None = None,
    **options: float | str | bool,
) -> tuple[dict[str, Any], dict[str, Any], Sampler]:
    """Run attack ``name`` on ``gateway`` for ``seconds`` (less if it ends by itself) beside
    a canary (connecting to ``canary_url``, a token in it where one is needed); return the
    attack's report, the canary's and the gateway's memory and descriptor samples.
    ``during`` is called once half-way through the attack; the canary goes on for ``settle``
    seconds after it, for its last messages."""
    assert gateway.process is not None
    watcher = canary(canary_url or gateway.ws_url, redis_url=redis_url)
    started = time.monotonic()
    try:
        time.sleep(1.0)  # the canary's first messages and pings, before any attack
        with Sampler(gateway.process.pid) as sampler:
            hostile = attack(name, gateway.ws_url, **options)
            try:
                hostile.wait(seconds / 2)
                if during is not None:
                    during()
                hostile.wait(seconds / 2)
            finally:
                report = hostile.stop()
            # The canary's last messages, after the attack; and at least CANARY_SECONDS in
            # all, so that it publishes enough to judge by when an attack ends by itself
            # early (12,000 channel names took 20 s on a slower machine, 1.5 s on this one).
            time.sleep(max(settle, started + CANARY_SECONDS - time.monotonic()))
        observed = watcher.stop()
    finally:
        watcher.kill()
    assert gateway.running, gateway.logs()[-3000:]
    figures = os.environ.get("WSGATEWAY_ATTACK_FIGURES")
    if figures:  # for the docs: what each attack did to the replica and the canary
        with open(figures, "a") as out:
            line = {
                "test": os.environ.get("PYTEST_CURRENT_TEST", name).split(" ")[0],
                "rss_growth_mib": round(sampler.growth_mib(), 1),
                "peak_fds": sampler.peak_fds,
                "canary_rtt_ms": observed["rtt_ms"],
                "canary_connect_ms": observed["connect_ms"],
                "attack": report,
            }
            out.write(json.dumps(line) + "\n")
    return report, observed, sampler


def assert_canary_unharmed(
    observed: dict[str, Any],
    rtt_p99_ms: float = RTT_P99_MS,
    connect_p99_ms: float = CONNECT_P99_MS,
) -> None:
    assert observed["published"] > 50, observed
    assert observed["lost"] == 0, observed
    assert observed["duplicates"] == 0, observed
    assert observed["disconnects"] == [], observed
    assert observed["connect_failures"] == 0, observed
    assert observed["rtt_ms"]["p99"] < rtt_p99_ms, observed
    assert observed["connect_ms"]["p99"] < connect_p99_ms, observed


def test_unfinished_handshakes_with_huge_headers_stay_within_budget(
    gateway_factory: GatewayFactory,
) -> None:
    """1,000 sockets start the upgrade and send 120 header lines of 8 KB, never finishing:
    before, RSS grew by 1 GB and stayed there. Each is cut at GATEWAY_MAX_HEADER_BYTES."""
    gateway = gateway_factory({"GATEWAY_ANONYMOUS_PUBLISH": "canary", "GATEWAY_LOG_LEVEL": "info"})
    report, observed, sampler = siege(gateway, "headers", sockets=1000, line_bytes=8000)
    assert report.get("answer:431", 0) > 1000, report  # cut at the header budget, answered
    assert sampler.growth_mib() < 64, sampler.samples[-5:]
    assert gateway.metric("wsgateway_handshakes_refused_total") >= report["answer:431"] * 0.9
    assert_canary_unharmed(observed)


def test_handshakes_held_open_are_bounded_in_count_and_bytes(
    gateway_factory: GatewayFactory,
) -> None:
    """Sockets that send 15 KB of headers (just under the budget) and then nothing: at most
    GATEWAY_MAX_HANDSHAKES of them at once, the oldest making room for the newest."""
    gateway = gateway_factory(
        {
            "GATEWAY_ANONYMOUS_PUBLISH": "canary",
            "GATEWAY_LOG_LEVEL": "info",
            "GATEWAY_MAX_HANDSHAKES": "500",
        }
    )
    report, observed, sampler = siege(
        gateway, "headers", sockets=1500, line_bytes=7500, lines=2, interval=60
    )
    assert report["opened"] > 1500, report
    # 500 handshakes of 15 KB and the canary's few sockets: the rest were displaced.
    assert sampler.peak_fds < 500 + 64, sampler.peak_fds
    assert sampler.growth_mib() < 32, sampler.samples[-5:]
    assert gateway.metric("wsgateway_handshakes_refused_total") > 500
    assert_canary_unharmed(observed)


def test_silent_sockets_cannot_take_the_descriptors_redis_needs(
    redis_server: RedisServer, gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    """Sockets that connect and say nothing, far more than the file limit allows: before,
    the Redis link failed with EMFILE and clients lost messages. Now the reserve holds: the
    Redis link stays up, readiness answers, and the canary gets every message."""
    files = 600
    gateway = gateway_factory(
        {"GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_LOG_LEVEL": "info"},
        files=(files, files),
    )
    readiness: list[int | None] = []

    def probe() -> None:
        readiness.extend(gateway.http_status("/readyz") for _ in range(5))

    report, observed, sampler = siege(
        gateway, "silent", redis_url=redis_server.url, sockets=3000, during=probe
    )
    assert report["opened"] > 3000, report
    assert readiness == [200] * 5
    assert sampler.peak_fds <= files, sampler.peak_fds
    assert gateway.metric("wsgateway_backplane_reconnects_total") == 0
    assert gateway.metric("wsgateway_handshakes_refused_total") > 0
    assert "Too many open files" not in gateway.logs()
    # Thousands of sockets a second through the accept queue: on a loaded machine a new
    # client's SYN may be dropped once (a second; measured up to 1.02 s), never twice.
    assert_canary_unharmed(observed, connect_p99_ms=CONNECT_P99_MS * 3)


@pytest.mark.parametrize("kind", ["pings", "fragments"])
def test_control_frame_and_fragment_floods_are_closed_1008(
    gateway_factory: GatewayFactory, kind: str
) -> None:
    """Ten clients send ping frames (or one-byte fragments) as fast as they can: every frame
    counts against GATEWAY_RATE_LIMIT, so each is closed with 1008 after its burst, and the
    rest of its flood is never parsed."""
    gateway = gateway_factory({"GATEWAY_ANONYMOUS_PUBLISH": "canary", "GATEWAY_LOG_LEVEL": "info"})
    report, observed, _ = siege(gateway, kind, clients=10)
    assert report.get("close:1008", 0) >= 10, report
    assert report.get("close:None", 0) == 0, report
    closed = gateway.metric(
        "wsgateway_connections_closed_total", websocket_close_code="1008", reason="rate_limit"
    )
    assert closed >= report["close:1008"]
    assert_canary_unharmed(observed, FLOOD_RTT_P99_MS)


@pytest.fixture
def storm_history(redis_server: RedisServer) -> RedisServer:
    """A history channel ``h.storm`` of 1,000 messages of 60 KiB each."""
    from publisher import Publisher
    from publisher.history import HistoryPolicy

    pad = "x" * (60 * 1024)
    with Publisher(redis_server.url, history=HistoryPolicy(patterns=("h.*",))) as publisher:
        for n in range(1000):
            publisher.publish("h.storm", {"n": n, "pad": pad})
    return redis_server


def storm_gateway(factory: GatewayFactory, redis: RedisServer, **env: str) -> GatewayProcess:
    return factory(
        {
            "GATEWAY_REDIS_URL": redis.url,
            "GATEWAY_HISTORY_CHANNELS": "h.*",
            "GATEWAY_LOG_LEVEL": "info",
            **env,
        }
    )


def test_a_resume_storm_beyond_the_replay_limit_starts_from_the_top(
    storm_history: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """40 clients resume from offset 0 of a 60 MB history at once: before, each replay was
    joined into one buffer per client (2.5 GB). 60 MB is beyond GATEWAY_REPLAY_MAX_BYTES:
    each gets recovered: false at once, and no read brings more than the limit."""
    gateway = storm_gateway(gateway_factory, storm_history)
    report, observed, sampler = siege(gateway, "resume", redis_url=storm_history.url, clients=40)
    assert report["recovered:false"] == 40, report
    assert report.get("recovered:true", 0) == 0, report
    assert sampler.growth_mib() < 32, sampler.samples[-5:]
    assert_canary_unharmed(observed)


def test_a_resume_storm_within_the_limit_is_paged_through_shared_messages(
    storm_history: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """40 clients each replay 6 MB (100 messages of 60 KiB, six times their queue bound) at
    once, 240 MB in all: the replica reads and frames the messages once, and each client
    takes them page by page as its socket drains (copies would take the 240 MB)."""
    gateway = storm_gateway(
        gateway_factory, storm_history, GATEWAY_REPLAY_MAX_BYTES=str(8 * 1024 * 1024)
    )
    report, observed, sampler = siege(
        gateway, "resume", redis_url=storm_history.url, clients=40, behind=100
    )
    assert report["recovered:true"] == 40, report
    assert report["bytes_received"] > 40 * 100 * 60 * 1024, report
    assert sampler.growth_mib() < 64, sampler.samples[-5:]
    assert_canary_unharmed(observed)


def test_resumers_that_do_not_read_hold_shared_messages_until_cut_off(
    storm_history: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """20 clients resume 6 MB each and never read: they hold the shared messages, not
    copies (120 MB), and are cut off by the stall timeout like any client that stops
    reading."""
    gateway = storm_gateway(
        gateway_factory,
        storm_history,
        GATEWAY_REPLAY_MAX_BYTES=str(8 * 1024 * 1024),
        GATEWAY_STALL_TIMEOUT="3",
    )
    report, observed, sampler = siege(
        gateway, "resume", redis_url=storm_history.url, clients=20, behind=100, no_read=True
    )
    assert report["connected"] == 20, report
    assert sampler.growth_mib() < 64, sampler.samples[-5:]
    assert (
        gateway.metric(
            "wsgateway_connections_closed_total",
            websocket_close_code="1013",
            reason="slow_consumer",
        )
        == 20
    )
    assert_canary_unharmed(observed)


@pytest.mark.timeout(300)  # the attack alone may take up to 120 s on a loaded machine
@pytest.mark.parametrize("backplane", ["memory", "redis", "cluster"])
def test_channel_names_leave_nothing_behind(
    backplane: str, request: pytest.FixtureRequest, gateway_factory: GatewayFactory
) -> None:
    """A connection subscribes to and unsubscribes from 12,000 channel names
    never used before (history channels, so each is read too): before, the Redis backplane
    kept ~0.9 KB per name for good. Now nothing of a name outlives its last subscriber, on
    any backplane, and no read leaves a key in Redis."""
    env = {
        "GATEWAY_RATE_LIMIT": "100000",
        "GATEWAY_HISTORY_CHANNELS": "names.*",
        "GATEWAY_ANONYMOUS_PUBLISH": "canary",
        "GATEWAY_LOG_LEVEL": "info",
    }
    redis_url = None
    if backplane == "redis":
        redis_url = request.getfixturevalue("redis_server").url
    elif backplane == "cluster":
        redis_url = request.getfixturevalue("cluster").url
    if redis_url is not None:
        env["GATEWAY_REDIS_URL"] = redis_url
    gateway = gateway_factory(env)
    # 12,000 names, however long that takes (20 s here, longer on a loaded machine): the old
    # leak (0.9 KB a name) would be 10.5 MB, twice the bound below.
    report, observed, sampler = siege(
        gateway, "channels", redis_url=redis_url, clients=1, names=12_000, seconds=120
    )
    assert report["names"] >= 12_000, report
    assert report["errors"] == 0, report
    assert gateway.metric("wsgateway_backplane_channels") == 0  # the canary has gone too
    assert sampler.samples[-1][1] - sampler.first_kib < 5 * 1024, sampler.samples[-5:]
    if backplane == "redis":
        assert request.getfixturevalue("redis_server").client_keys() == set()
    elif backplane == "cluster":
        cluster = request.getfixturevalue("cluster")
        assert all(node.client_keys() == set() for node in cluster.primaries())
    assert_canary_unharmed(observed)


@pytest.mark.parametrize(
    ("deep", "rate"), [(False, 50_000), (True, 5_000)], ids=["valid", "too-deep"]
)
def test_a_flood_from_redis_is_shed_on_its_own_channel(
    redis_server: RedisServer, gateway_factory: GatewayFactory, deep: bool, rate: int
) -> None:
    """A publisher floods one channel through Redis with 50,000 messages a second (9 MB/s),
    faster than the replica can fan them out to its 20 subscribers; or with 5,000 envelopes
    a second (20 MB/s) too deeply nested to decode. (Unpaced, a pipelined publisher reached
    95,000 a second here, at the edge of what one replica can even read on two cores: in about
    half the runs Redis's 32 MB buffer for it filled after 10 s and it reconnected, which
    docs/limits.md says is what a publisher faster than the replica can read does.)
    Before, Redis disconnected the replica for its output buffer and every channel lost what
    was published meanwhile, and each envelope it could not decode logged a traceback. Now
    the flood's own oldest messages are shed (counted), and the canary on another channel
    loses nothing: its messages share the replica's one pub/sub connection with the flood, so
    on a slow machine they arrive seconds late, which is why the canary listens for 5 s after
    the flood."""
    gateway = gateway_factory({"GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_LOG_LEVEL": "info"})
    report, observed, sampler = siege(
        gateway,
        "publish",
        redis_url=redis_server.url,
        clients=20,
        channel="flood",
        redis=redis_server.url,
        deep=deep,
        rate=rate,
        settle=5.0,
    )
    assert report["published"] > 40_000, report
    assert gateway.metric("wsgateway_backplane_reconnects_total") == 0
    assert sampler.growth_mib() < 64, sampler.samples[-5:]
    logs = gateway.logs()
    assert "Traceback" not in logs
    assert logs.count('"level": "warning"') <= ATTACK_SECONDS + 5  # one line a second at most
    if deep:
        assert gateway.metric("wsgateway_messages_malformed_total", reason="depth") > 40_000
    else:
        # (Whether fan-out fell behind enough to shed depends on the machine's speed against
        # the publisher's: tests/test_backlog.py checks the shedding itself.)
        assert report["bytes_received"] > 0
    assert_canary_unharmed(observed)


@pytest.mark.timeout(300)  # the attack alone may take up to 120 s on a loaded machine
def test_connection_churn_returns_memory_to_its_baseline(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """Thousands of connections open, ask for 20 channels never used before and leave
    without waiting for the answers: the replica drops what a departed client asked for,
    releases everything of it, and its RSS comes back to within 5 MiB of where it was
    (measured after a short warm-up, so the allocator's first growth is not counted)."""
    gateway = gateway_factory({"GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_LOG_LEVEL": "info"})
    warm_up = attack("churn", gateway.ws_url, clients=20)
    time.sleep(3)
    warm_up.stop()
    time.sleep(1)
    # 2,500 connections, however long that takes (5 s here, longer on a loaded machine).
    report, observed, sampler = siege(
        gateway, "churn", redis_url=redis_server.url, clients=20, opened=2500, seconds=120
    )
    assert report["opened"] >= 2500, report
    assert sampler.samples[-1][1] - sampler.first_kib < 5 * 1024, sampler.samples[-5:]
    assert gateway.metric("wsgateway_backplane_channels") == 0
    assert redis_server.pubsub_channels() == set()
    assert_canary_unharmed(observed)


def test_compression_bombs_are_closed_1009_without_inflating(
    gateway_factory: GatewayFactory,
) -> None:
    """With permessage-deflate on, clients send a 100 KB frame that inflates to 100 MB:
    the replica stops inflating at GATEWAY_MAX_MESSAGE_SIZE and closes with 1009."""
    gateway = gateway_factory(
        {
            "GATEWAY_COMPRESSION": "deflate",
            "GATEWAY_ANONYMOUS_PUBLISH": "canary",
            "GATEWAY_LOG_LEVEL": "info",
        }
    )
    report, observed, sampler = siege(gateway, "bombs", clients=10)
    assert report["close:1009"] > 100, report
    assert report["close:1009"] >= report["opened"] - 10, report  # the last may be cut short
    assert sampler.growth_mib() < 32, sampler.samples[-5:]
    assert_canary_unharmed(observed)


@pytest.mark.parametrize(
    ("size", "rate"), [(1_000_000, 4.0), (60_000, 20.0)], ids=["1MB-4/s", "60KB-20/s"]
)
def test_large_documents_that_change_entirely_never_block_the_replica(
    redis_server: RedisServer, gateway_factory: GatewayFactory, size: int, rate: float
) -> None:
    """A subscriber takes deltas on a channel of large documents that change entirely. A
    delta is a search of the whole text on the replica's loop: before, about 120 ms for
    1 MB (250 ms on a slower VM), and the canary's round trips, deliveries and new
    connections waited behind it. Now texts over GATEWAY_DELTA_MAX_BYTES (64 KiB) go whole,
    and the search gives up once half the text is new (a few milliseconds at 64 KiB)."""
    gateway = gateway_factory(
        {
            "GATEWAY_REDIS_URL": redis_server.url,
            "GATEWAY_HISTORY_CHANNELS": "big.*",
            "GATEWAY_DELTA_CHANNELS": "big.*",
            "GATEWAY_LOG_LEVEL": "info",
        }
    )
    report, observed, _ = siege(
        gateway,
        "deltas",
        redis_url=redis_server.url,
        channel="big.doc",
        redis=redis_server.url,
        clients=1,
        size=size,
        rate=rate,
    )
    assert report["published"] >= rate * ATTACK_SECONDS / 2, report
    assert report["published"] - 1 <= report["messages"] <= report["published"], report
    assert_canary_unharmed(observed, FLOOD_RTT_P99_MS)
    assert report["fulls"] == report["messages"], report  # no delta was worth making


def test_refreshes_with_large_forged_tokens_are_refused_unread_then_closed(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """20 connections with valid tokens send refreshes of 60 KB forged tokens, under the
    frame rate limit: before, PyJWT decoded every one whole before seeing the signature was
    wrong (30-50 us per KB), and the replica spent more than a core on them. Now a token over
    GATEWAY_MAX_TOKEN_BYTES is refused unread, refreshes wait a second between them, and a
    connection is closed 1008 after three refused in a row."""
    from tests.test_security import SECRET, token

    gateway = gateway_factory(
        {
            "GATEWAY_REDIS_URL": redis_server.url,
            "GATEWAY_JWT_SECRET": SECRET,
            "GATEWAY_LOG_LEVEL": "info",
        }
    )
    canary_token = token(sub="canary", channels=["canary"], publish=["canary"])
    report, observed, _ = siege(
        gateway,
        "refresh",
        redis_url=redis_server.url,
        canary_url=f"{gateway.ws_url}?token={canary_token}",
        clients=20,
        size=60_000,
        secret=SECRET,
    )
    assert report["sent"] > 1000, report
    assert_canary_unharmed(observed, FLOOD_RTT_P99_MS)
    assert report.get("close:1008", 0) >= 20, report
    assert (
        gateway.metric(
            "wsgateway_connections_closed_total", websocket_close_code="1008", reason="refresh"
        )
        >= report["close:1008"]
    )


def test_presence_reads_cannot_turn_small_requests_into_a_busy_redis(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    """40 connections read the presence of a room of 1,000 members (300-byte entries) as
    fast as the frame rate limit lets them: each 40-byte request brings back 300 KB and
    costs the shared Redis a scan. Before, that was 600 reads a second here (1.9 GB sent in
    10 s; Redis at half a core in the issue's measurement); now each connection gets
    GATEWAY_PRESENCE_READ_RATE (1) a second, ten at once, the rest `limit` without touching
    Redis: 0.08 of a core."""
    from publisher.presence import JOIN_LUA, PURGE, presence_keys

    gateway = gateway_factory(
        {
            "GATEWAY_REDIS_URL": redis_server.url,
            "GATEWAY_PRESENCE_CHANNELS": "room.*",
            "GATEWAY_LOG_LEVEL": "info",
        }
    )
    # The room's members, written as a replica writes them (the reads only scan Redis).
    now_ms = int(time.time() * 1000)
    args: list[str | int] = [PURGE, now_ms, now_ms + 600_000, 600_000]
    for n in range(1000):
        client_id = f"{n:032x}"
        entry = json.dumps({"client": client_id, "user": f"u{n}", "info": {"bio": "x" * 230}})
        args += [client_id, f"u{n}", entry]
    redis_server.command("EVAL", JOIN_LUA, "3", *presence_keys("ws:", "room.big"), *map(str, args))
    cpu_before = redis_cpu(redis_server)
    report, observed, _ = siege(
        gateway, "reads", redis_url=redis_server.url, clients=40, channel="room.big"
    )
    redis_share = (redis_cpu(redis_server) - cpu_before) / report["seconds"]
    assert report["pages"] > 40, report
    # Ten at once, then one a second, per connection (GATEWAY_PRESENCE_READ_RATE).
    assert report["pages"] <= 40 * (10 + 1 * report["seconds"]) + 40, report
    assert report["refused"] > 5 * report["pages"], report
    assert redis_share < 0.15, redis_share
    assert_canary_unharmed(observed)


def redis_cpu(server: RedisServer) -> float:
    """CPU seconds the Redis server has used."""
    info = server.command("INFO", "cpu")
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    return float(fields["used_cpu_sys"]) + float(fields["used_cpu_user"])

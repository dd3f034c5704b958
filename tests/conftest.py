from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import GatewayProcess, RedisClusterServers, RedisServer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    """A real six-node Redis Cluster (three primaries, a replica each)."""
    servers = RedisClusterServers(tmp_path / "cluster").start()
    yield servers
    servers.stop()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Start real ``wsgateway`` replicas: ``gateway_factory(env={...})``; all stopped at the end."""
    started: list[GatewayProcess] = []

    def start(
        env: dict[str, str] | None = None,
        wait_ready: bool = True,
        files: tuple[int, int] | None = None,
    ) -> GatewayProcess:
        process = GatewayProcess(tmp_path, env, name=f"gw{len(started)}", files=files)
        started.append(process)
        return process.start(wait_ready=wait_ready)

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def memory_gateway(gateway_factory: Callable[..., GatewayProcess]) -> GatewayProcess:
    """One replica on the embedded memory backplane, with client publishing allowed."""
    return gateway_factory({"GATEWAY_ANONYMOUS_PUBLISH": "chat*,public.*"})


@pytest.fixture
def redis_gateways(
    redis_server: RedisServer, gateway_factory: Callable[..., GatewayProcess]
) -> tuple[GatewayProcess, GatewayProcess]:
    """Two replicas on one real Redis."""
    env = {"GATEWAY_REDIS_URL": redis_server.url}
    return gateway_factory(env), gateway_factory(env)

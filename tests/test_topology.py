"""The compose topology without containers: the same Redis, three wsgateway processes with the
environment compose.yaml gives them, and the very nginx.conf compose mounts, on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from websockets.exceptions import ConnectionClosed

from tests.harness import (
    GatewayFactory,
    GatewayProcess,
    RedisServer,
    async_wait_until,
    client,
    envelope,
    free_port,
    recv_json,
    wait_until,
)

ROOT = Path(__file__).parent.parent
NGINX_DIR = ROOT / "deploy" / "compose" / "nginx"
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def compose_gateway_env() -> dict[str, str]:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return {k: str(v) for k, v in compose["services"]["gateway"]["environment"].items()}


@pytest.fixture
def load_balancer(tmp_path: Path) -> Iterator[Any]:
    if NGINX is None:
        pytest.fail("nginx is not installed (./dev test installs it)")
    processes: list[subprocess.Popen[bytes]] = []

    def start(ports: list[int]) -> int:
        conf = tmp_path / "nginx"
        conf.mkdir()
        shutil.copyfile(NGINX_DIR / "nginx.conf", conf / "nginx.conf")  # the very same file
        port = free_port()
        (conf / "listen.conf").write_text(f"listen 127.0.0.1:{port};\n")
        (conf / "upstreams.conf").write_text(
            "".join(f"server 127.0.0.1:{p} max_fails=0;\n" for p in ports)
        )
        config = (
            (conf / "nginx.conf")
            .read_text()
            .replace("pid /tmp/nginx.pid;", f"pid {conf}/nginx.pid;")
        )
        (conf / "nginx.conf").write_text(config)
        assert NGINX is not None
        process = subprocess.Popen(
            [NGINX, "-p", str(conf), "-c", str(conf / "nginx.conf"), "-g", "daemon off;"],
            stderr=open(conf / "error.log", "wb"),  # noqa: SIM115 - lives with the process
        )
        processes.append(process)
        wait_until(lambda: _listening(port), timeout=10)
        return port

    yield start
    for process in processes:
        process.terminate()
        process.wait(10)


def _listening(port: int) -> bool:
    import socket

    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def test_the_compose_pid_path_is_what_the_test_replaces() -> None:
    # The only line the test changes (so parallel runs do not share a pid file).
    assert "pid /tmp/nginx.pid;" in (NGINX_DIR / "nginx.conf").read_text()


async def test_publish_reaches_every_replica_and_a_stopped_replica_moves_its_clients(
    redis_server: RedisServer, gateway_factory: GatewayFactory, load_balancer: Any
) -> None:
    env = {
        **compose_gateway_env(),
        # Compose's host names do not exist here; everything else is as compose gives it.
        "GATEWAY_REDIS_URL": redis_server.url,
        "OTEL_TRACES_EXPORTER": "none",
    }
    replicas: list[GatewayProcess] = [gateway_factory(env) for _ in range(3)]
    lb_port = load_balancer([g.port for g in replicas])
    url = f"ws://127.0.0.1:{lb_port}/ws?channels=feed"
    clients = 30
    received: list[list[int]] = [[] for _ in range(clients)]
    drained = [False] * clients
    connected = [asyncio.Event() for _ in range(clients)]
    done = asyncio.Event()

    async def subscriber(index: int) -> None:
        while not done.is_set():
            try:
                async with client(url) as ws:
                    assert (await recv_json(ws))["op"] == "subscribed"
                    connected[index].set()
                    while True:
                        message = await recv_json(ws, timeout=30)
                        received[index].append(message["data"])
            except ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code == 1001
                drained[index] = True  # its replica went away: reconnect through nginx
                connected[index].clear()

    tasks = [asyncio.create_task(subscriber(i)) for i in range(clients)]
    for event in connected:
        await asyncio.wait_for(event.wait(), 10)

    def open_on(gateway: GatewayProcess) -> float:
        text = gateway.http("/metrics")[1]
        line = next(x for x in text.splitlines() if x.startswith("wsgateway_connections_open"))
        return float(line.rsplit(" ", 1)[1])

    spread = [open_on(g) for g in replicas]
    assert sum(spread) == clients and min(spread) >= clients // 3 - 2, spread  # least_conn

    publisher = redis.asyncio.Redis.from_url(redis_server.url)
    sequence = 0

    async def publish(count: int) -> None:
        nonlocal sequence
        for _ in range(count):
            await publisher.publish("ws:feed", envelope("feed", sequence))
            sequence += 1
            await asyncio.sleep(0.02)

    await publish(20)
    stopper = threading.Thread(target=replicas[0].stop)  # SIGTERM: drains over 10 s
    stopper.start()
    while stopper.is_alive():
        await publish(10)
    await asyncio.to_thread(stopper.join)
    assert replicas[0].process is not None and replicas[0].process.returncode == 0
    for event in connected:  # the last of its clients are back, subscribed through nginx
        await asyncio.wait_for(event.wait(), 10)
    await publish(20)
    await async_wait_until(lambda: all(r and r[-1] == sequence - 1 for r in received))
    done.set()
    for task in tasks:
        task.cancel()
    for task in tasks:  # an assertion that failed inside a subscriber fails the test here
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await publisher.aclose()

    moved = [i for i in range(clients) if drained[i]]
    stayed = [i for i in range(clients) if not drained[i]]
    assert len(moved) == spread[0]  # exactly the stopped replica's clients were moved
    for i in stayed:  # the surviving replicas' clients lost nothing
        assert received[i] == list(range(sequence)), i
    for i in moved:  # the moved ones are back and receiving again
        assert received[i][-20:] == list(range(sequence - 20, sequence)), i
    # Every client ended up on the two surviving replicas, and all of them have left now.
    await async_wait_until(lambda: sum(open_on(g) for g in replicas[1:]) == 0)

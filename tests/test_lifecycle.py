"""Start-up, configuration errors and SIGTERM/SIGINT shutdown of a real wsgateway process."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Close, Opcode

from gateway.settings import Settings, env_name
from tests.harness import GatewayFactory, RawClient, async_wait_until, client, recv_json


def run_gateway(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


def help_blocks(text: str) -> dict[str, str]:
    """``--help``'s options, each option's lines joined into one: {"--port": "--port int ..."}."""
    options = text.split("\noptions:\n", 1)[1]
    blocks = (" ".join(b.split()).replace("- ", "-") for b in re.split(r"\n(?=  -)", options))
    return {b.split()[0].rstrip(","): b for b in blocks}


def test_help_lists_every_setting_with_its_variable_and_default() -> None:
    result = run_gateway("--help")
    assert result.returncode == 0
    blocks = help_blocks(result.stdout)
    assert len(blocks) == len(Settings.model_fields) + 1  # and -h
    for name, field in Settings.model_fields.items():
        block = blocks["--" + name.replace("_", "-")]
        assert f"[{env_name(name)}]" in block, block
        assert block.endswith(f"(default: {field.default})"), block
        assert field.description and field.description.split()[0] in block, block


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        ((), {"GATEWAY_PORT": "70000"}, "GATEWAY_PORT (--port)"),
        (("--port", "http"), {}, "GATEWAY_PORT (--port)"),
        ((), {"GATEWAY_SLOW_CONSUMER_POLICY": "pray"}, "GATEWAY_SLOW_CONSUMER_POLICY"),
        ((), {"GATEWAY_QUEUE_MAX_MESSAGES": "0"}, "GATEWAY_QUEUE_MAX_MESSAGES"),
        ((), {"GATEWAY_PING_INTERVAL": "-1"}, "GATEWAY_PING_INTERVAL"),
        ((), {"GATEWAY_LOG_LEVEL": "chatty"}, "GATEWAY_LOG_LEVEL"),
        ((), {"GATEWAY_REDIS_URL": "http://user:hunter2@redis"}, "GATEWAY_REDIS_URL"),
        (("--no-such-flag",), {}, "unrecognized arguments: --no-such-flag"),
    ],
)
def test_invalid_settings_stop_start_up_with_one_line_and_exit_2(
    args: tuple[str, ...], env: dict[str, str], names: str
) -> None:
    result = run_gateway(*args, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("wsgateway: ")
    assert names in lines[0]
    assert "hunter2" not in result.stderr


def test_flags_override_environment() -> None:
    settings = Settings(_cli_parse_args=["--port", "9000", "--slow-consumer-policy", "drop-oldest"])
    assert (settings.port, settings.slow_consumer_policy) == (9000, "drop-oldest")
    os.environ["GATEWAY_QUEUE_MAX_MESSAGES"] = "12"
    try:
        assert Settings(_cli_parse_args=[]).queue_max_messages == 12
        assert Settings(_cli_parse_args=["--queue-max-messages", "7"]).queue_max_messages == 7
    finally:
        del os.environ["GATEWAY_QUEUE_MAX_MESSAGES"]


def test_redis_url_never_appears_in_reprs() -> None:
    settings = Settings(_cli_parse_args=["--redis-url", "redis://:hunter2@redis:6379/0"])
    assert "hunter2" not in repr(settings)
    assert settings.redis_url is not None
    assert settings.redis_url.get_secret_value() == "redis://:hunter2@redis:6379/0"


def test_a_taken_port_exits_1_with_a_reason(gateway_factory: GatewayFactory) -> None:
    running = gateway_factory()
    result = run_gateway(env={"GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(running.port)})
    assert result.returncode == 1
    assert "cannot start" in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_closes_clients_with_1001_and_exits_0(
    gateway_factory: GatewayFactory, signum: int
) -> None:
    gateway = gateway_factory()
    async with (
        client(gateway.ws_url + "?channels=a") as one,
        client(gateway.ws_url + "?channels=b") as two,
    ):
        await recv_json(one)
        await recv_json(two)
        gateway.signal(signum)
        for ws in (one, two):
            with pytest.raises(ConnectionClosed):
                await recv_json(ws)
            assert ws.close_code == 1001
        assert await asyncio.to_thread(gateway.wait) == 0
    assert "shutting down" in gateway.logs()


async def test_draining_replica_fails_readiness_and_refuses_handshakes(
    gateway_factory: GatewayFactory,
) -> None:
    # A client that never acknowledges the close frame keeps the drain open close_timeout long.
    gateway = gateway_factory({"GATEWAY_CLOSE_TIMEOUT": "3"})
    stubborn = RawClient(gateway.ws_url)
    try:
        gateway.signal(signal.SIGTERM)
        await async_wait_until(lambda: gateway.http("/readyz")[0] == 503, timeout=5)
        assert gateway.http("/readyz") == (503, "draining\n")
        assert gateway.http("/healthz") == (200, "ok\n")
        with pytest.raises(InvalidStatus) as caught:
            async with client(gateway.ws_url):
                pass
        assert caught.value.response.status_code == 503
        frames = await asyncio.to_thread(stubborn.read_frames, 10.0)
        assert [f.opcode for f in frames] == [Opcode.CLOSE]
        assert Close.parse(frames[0].data).code == 1001
    finally:
        stubborn.close()
    # The stubborn client was cut off after close_timeout and the process still exits 0.
    assert await asyncio.to_thread(gateway.wait) == 0

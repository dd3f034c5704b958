"""The whole system under Docker Compose, for tests/test_system.py: compose.yaml with
tests/system/compose.yaml on top, under a project name of its own and on free host ports, so a
user's own ``docker compose up`` is never touched.

Images: the official ones compose.yaml names, or, when ``deploy/standins/build`` has written
``deploy/standins/standins.env``, the local stand-ins it made. Nothing here installs or starts
a Docker engine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.harness import free_port

ROOT = Path(__file__).parent.parent
STANDINS = ROOT / "deploy" / "standins" / "standins.env"
#: What the system test runs: everything in compose.yaml but Jaeger and Grafana (no image of
#: theirs can be made from Debian packages; the receiver takes the collector's place).
SERVICES = ("redis", "gateway", "lb", "publisher", "prometheus", "otel-collector")
#: Set by CI, where the engine is provisioned: a system test that cannot run is a failure there.
REQUIRED = os.environ.get("WSGATEWAY_SYSTEM_TEST") == "required"


def _run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def unavailable() -> str | None:
    """Why the system cannot run on this machine, or None."""
    if shutil.which("docker") is None:
        return "no docker command on this machine"
    if _run("docker", "info").returncode != 0:
        return "no Docker engine answers here (`docker info` failed)"
    version = _run("docker", "compose", "version", "--short")
    if version.returncode != 0:
        return "the docker compose plugin is missing"
    found = tuple(int(n) for n in re.findall(r"\d+", version.stdout)[:2])
    if found < (2, 24):  # tests/system/compose.yaml uses !reset and !override
        return f"docker compose 2.24 or newer is needed ({version.stdout.strip()} found)"
    return None


class Stack:
    """One compose project: ``up()``, then containers to break and endpoints to watch."""

    def __init__(self, project: str) -> None:
        self.project = project
        self.http_port = free_port()
        self.prometheus_port = free_port()
        self.receiver_port = free_port()
        self.env = {
            **os.environ,
            "WSGATEWAY_HTTP_PORT": str(self.http_port),
            "WSGATEWAY_PROMETHEUS_PORT": str(self.prometheus_port),
            "WSGATEWAY_RECEIVER_PORT": str(self.receiver_port),
        }
        self.env_file = STANDINS if STANDINS.exists() else None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.http_port}/ws"

    def compose(
        self, *args: str, timeout: float = 300, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.command(*args), cwd=ROOT, env=self.env, input=stdin,
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise RuntimeError(
                f"docker compose {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
            )
        return result

    def command(self, *args: str) -> list[str]:
        files = ["-f", str(ROOT / "compose.yaml"), "-f", str(ROOT / "tests/system/compose.yaml")]
        env_file = ["--env-file", str(self.env_file)] if self.env_file else []
        return ["docker", "compose", "-p", self.project, *env_file, *files, *args]

    def images_missing(self) -> str | None:
        """None when every image the stack runs is here or could be pulled, else why not."""
        images = self.compose("config", "--images", *SERVICES).stdout.split()
        built = self.compose("config", "--images", "gateway").stdout.split()
        absent = [
            i for i in images if i not in built and _run("docker", "image", "inspect", i).returncode
        ]
        if not absent:
            return None
        pulled = self.compose("pull", "--quiet", "--ignore-buildable", *SERVICES, check=False)
        if pulled.returncode != 0:
            return (
                f"images {', '.join(absent)} are not here and no registry answered; "
                "deploy/standins/build makes local stand-ins from Debian packages"
            )
        return None

    def up(self) -> None:
        self.compose("build", timeout=900)
        self.compose("up", "--detach", "--wait", "--wait-timeout", "180", *SERVICES, timeout=300)

    def down(self) -> str:
        """Stop and remove everything (volumes included); returns the logs first."""
        logs = self.compose("logs", "--no-color", "--timestamps", check=False, timeout=120).stdout
        self.compose("down", "--volumes", "--timeout", "5", check=False, timeout=300)
        return logs

    # Containers.

    def containers(self, service: str) -> list[str]:
        """The names of the service's running containers, in replica order."""
        out = self.compose("ps", "--format", "{{.Name}}", service).stdout
        return sorted(out.split())

    def docker(self, *args: str, timeout: float = 120) -> str:
        result = _run("docker", *args, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} failed: {result.stderr}")
        return result.stdout

    def state(self, container: str) -> dict[str, Any]:
        return json.loads(self.docker("inspect", "--format", "{{json .State}}", container))  # type: ignore[no-any-return]

    def wait_healthy(self, container: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while (health := self.state(container).get("Health", {}).get("Status")) != "healthy":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{container} is {health}, not healthy, after {timeout}s")
            time.sleep(0.5)

    def http(self, container: str, path: str) -> tuple[int, str]:
        """GET ``path`` from the replica's port, asked from inside its container (no replica
        port is published: clients only ever see nginx)."""
        probe = (
            "import sys, urllib.request, urllib.error\n"
            "try: r = urllib.request.urlopen('http://127.0.0.1:8765' + sys.argv[1], timeout=3)\n"
            "except urllib.error.HTTPError as e: r = e\n"
            "print(r.status); print(r.read().decode())\n"
        )
        answer = self.docker("exec", container, "python", "-c", probe, path)
        status, _, body = answer.partition("\n")
        return int(status), body

    def readyz(self, container: str) -> int:
        return self.http(container, "/readyz")[0]

    def gauge(self, container: str, name: str) -> float:
        """A gauge's value on one replica now (its /metrics, not a scrape seconds old)."""
        text = self.http(container, "/metrics")[1]
        return float(next(x for x in text.splitlines() if x.startswith(name + "{")).split()[-1])

    # Publishing from a service container, as a service would.

    def publish(self, channel: str, values: list[Any]) -> str:
        """Every value, one line each, through ``wspublish --stdin`` in the publisher container."""
        lines = "".join(json.dumps(v) + "\n" for v in values)
        return self.compose(
            "exec", "-T", "publisher", "wspublish", channel, "--stdin", stdin=lines
        ).stdout

    def paced_publisher(self, channel: str, rate: float) -> PacedPublisher:
        return PacedPublisher(
            self.command("exec", "-T", "publisher", "wspublish", channel, "--stdin"), self.env, rate
        )

    # What the observers saw.

    def prometheus(self, query: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.prometheus_port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": query}
        )
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)["data"]["result"]  # type: ignore[no-any-return]

    def prometheus_targets(self) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.prometheus_port}/api/v1/targets"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)["data"]["activeTargets"]  # type: ignore[no-any-return]

    def received(self) -> dict[str, Any]:
        """What the OTLP receiver got: spans (service, name, ids, links) and metric names."""
        url = f"http://127.0.0.1:{self.receiver_port}/received"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)  # type: ignore[no-any-return]


class PacedPublisher:
    """Numbers 0, 1, 2... published at ``rate`` a second by one ``wspublish --stdin`` in the
    publisher container, from a thread, until ``stop()``; ``count`` is how many were sent."""

    def __init__(self, command: list[str], env: dict[str, str], rate: float) -> None:
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.rate = rate
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self.process.stdin is not None
        start = time.monotonic()
        while not self._stop.is_set():
            self.process.stdin.write(f"{self.count}\n")
            self.process.stdin.flush()
            self.count += 1
            self._stop.wait(max(0.0, start + self.count / self.rate - time.monotonic()))

    def stop(self) -> int:
        """Stop, wait for wspublish to publish what it was given; returns the count."""
        self._stop.set()
        self._thread.join()
        out, err = self.process.communicate(timeout=60)  # closes stdin: wspublish ends
        if self.process.returncode != 0:
            raise RuntimeError(f"wspublish failed ({self.process.returncode}): {out}{err}")
        return self.count

"""The pieces of an attack on a real gateway process: the hostile clients (``bench.attacks``)
and the canary (``bench.canary``) each in a process of its own, and a sampler of the
gateway's memory and descriptors. The adversarial tests and ``bench.soak`` use them.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tests.harness import rss_kib


class Program:
    """``python -m <module> ...`` in the background; its last JSON line is its report."""

    def __init__(self, module: str, *args: str, ready: str) -> None:
        # Its errors go to a file: a pipe nobody reads would stop it once full.
        self._errors = tempfile.TemporaryFile("w+")  # noqa: SIM115 - lives as long as it
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=subprocess.PIPE,
            stderr=self._errors,
            text=True,
        )
        self.lines: list[dict[str, Any]] = []
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != ready:
            self.process.kill()
            self.process.communicate(timeout=10)
            raise RuntimeError(f"{module} did not start: {line!r}\n{self.errors()[-2000:]}")

    def wait(self, seconds: float) -> None:
        """Wait ``seconds``, or less if it ends by itself."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(seconds)

    def errors(self) -> str:
        self._errors.seek(0)
        return self._errors.read()

    def stop(self, timeout: float = 30) -> dict[str, Any]:
        """Stop it; its report (the last JSON line it printed; the others in ``lines``)."""
        if self.process.poll() is None:
            self.process.terminate()
        out, _ = self.process.communicate(timeout=timeout)
        self.lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        if not self.lines:
            raise RuntimeError(
                f"no report (exit {self.process.returncode}):\n{self.errors()[-3000:]}"
            )
        report: dict[str, Any] = self.lines[-1]
        return report

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate(timeout=10)


def canary(url: str, *, redis_url: str | None = None, **options: float | str) -> Program:
    """A canary subscribed to ``canary`` (through Redis, or publishing on its own socket)."""
    args = ["--url", url]
    if redis_url is not None:
        args += ["--redis-url", redis_url]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return Program("bench.canary", *args, ready="ready")


def attack(name: str, url: str, **options: float | str | bool) -> Program:
    args = [name, "--url", url]
    for option, value in options.items():
        flag = f"--{option.replace('_', '-')}"
        if value is True:
            args.append(flag)
        elif value is not False:
            args += [flag, str(value)]
    return Program("bench.attacks", *args, ready="started")


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Sampler:
    """The RSS (KiB) and open descriptors of a process, every ``interval`` in a thread."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int, int]] = []  # (seconds since start, KiB, fds)
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()

    def sample(self) -> tuple[float, int, int]:
        try:
            entry = (
                time.monotonic() - self._started,
                rss_kib(self.pid),
                descriptors(self.pid),
            )
        except (FileNotFoundError, ProcessLookupError):
            return self.samples[-1] if self.samples else (0.0, 0, 0)
        self.samples.append(entry)
        return entry

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    @property
    def first_kib(self) -> int:
        return self.samples[0][1]

    @property
    def peak_kib(self) -> int:
        return max(kib for _, kib, _ in self.samples)

    @property
    def peak_fds(self) -> int:
        return max(fds for _, _, fds in self.samples)

    def growth_mib(self) -> float:
        return (self.peak_kib - self.first_kib) / 1024

    def write(self, path: Path) -> None:
        path.write_text("".join(f"{t:.2f} {kib} {fds}\n" for t, kib, fds in self.samples))

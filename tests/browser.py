"""Headless Chromium driven over the DevTools protocol, with nothing but ``websockets``.

``Browser`` starts the Debian ``chromium`` in a temp profile; ``await browser.open(url)``
gives a :class:`Page` whose ``evaluate`` runs JavaScript in it and returns the value.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from tests.harness import wait_until

__all__ = ["Browser", "Page"]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _json(request: urllib.request.Request) -> Any:
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


class Page:
    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; events arriving meanwhile are ignored."""
        command_id = next(self._ids)
        await self._ws.send(json.dumps({"id": command_id, "method": method, "params": params}))
        while True:
            reply = json.loads(await asyncio.wait_for(self._ws.recv(), 10))
            if reply.get("id") == command_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply["result"]
                return result

    async def evaluate(self, expression: str) -> Any:
        result = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 15.0) -> Any:
        """Poll ``expression`` until it is truthy (throwing counts as not yet: the page may
        still be loading); return its value."""
        deadline = time.monotonic() + timeout
        last_error: RuntimeError | None = None
        while True:
            try:
                value = await self.evaluate(expression)
            except RuntimeError as exc:
                value, last_error = None, exc
            else:
                last_error = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} still falsy after {timeout}s: {last_error}")
            await asyncio.sleep(0.05)


class Browser:
    def __init__(self, workdir: Path) -> None:
        if CHROMIUM is None:
            raise RuntimeError("chromium is not installed (./dev test installs it)")
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._pages: list[ClientConnection] = []

    def start(self) -> Browser:
        profile = self.workdir / "chromium-profile"
        profile.mkdir(parents=True, exist_ok=True)
        assert CHROMIUM is not None
        self.process = subprocess.Popen(
            [
                CHROMIUM,
                "--headless=new",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                "--no-sandbox",  # CI runs as root
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(self.workdir / "chromium.log").open("wb"),
        )
        active = profile / "DevToolsActivePort"
        wait_until(lambda: active.exists() and active.read_text().count("\n") >= 1, timeout=30)
        self.port = int(active.read_text().split("\n")[0])
        return self

    async def open(self, url: str) -> Page:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/json/new?{urllib.parse.quote(url, safe='')}",
            method="PUT",
        )
        target = await asyncio.to_thread(_json, request)
        ws = await connect(target["webSocketDebuggerUrl"], max_size=None, ping_interval=None)
        self._pages.append(ws)
        return Page(ws)

    async def close(self) -> None:
        for ws in self._pages:
            await ws.close()
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

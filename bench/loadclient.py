"""A load client: many WebSocket connections in one process, as light as a client can be.

``python -m bench.loadclient --url ws://host:port/ws?channels=bench --connections N``
opens N connections (handshake by hand) and counts the ``message`` frames they receive as
cheaply as Python can: most connections count occurrences of the frames' fixed prefix in each
read (one C-speed ``bytes.count``, whatever the number of frames), and one connection in
``LATENCY_EVERY``, drawn at random, parses its frames and decodes each message to take
``now - data.sent`` as the delivery latency. (At random: every twentieth would line up with
any order a server keeps its clients in by the count they connected in; a server writing
every fourth client first once looked 2 ms faster that way.) ``--stalled K`` makes K of the
connections stop reading after the handshake. It prints one JSON line with its counts and
latency samples when it gets SIGTERM (or stdin closes).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import signal
import socket
import sys
import time
from typing import Any, cast
from urllib.parse import urlsplit

LATENCY_EVERY = 20  # one connection in 20 decodes its messages for latency samples
MESSAGE = b'{"op":"message"'  # how every message frame's payload starts


class Counter(asyncio.Protocol):
    """One connection: counts whole frames; optionally decodes them for latency."""

    def __init__(self, sample: bool, stalled: bool, results: dict[str, Any]) -> None:
        self.sample = sample
        self.stalled = stalled
        self.results = results
        self.buffer = b""
        self.frames = 0
        self.upgraded = False
        self.ready = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if not self.upgraded:
            head, sep, data = (self.buffer + data).partition(b"\r\n\r\n")
            if not sep:
                self.buffer = head
                return
            self.buffer = b""
            self.upgraded = True
            if not self.ready.done():
                self.ready.set_result(head.startswith(b"HTTP/1.1 101"))
            if self.stalled and self.transport is not None:
                self.transport.pause_reading()  # the application stops reading
        if self.stalled:
            return
        if not self.sample:
            # The prefix cannot occur inside a bench payload; a prefix cut in two by a read
            # boundary is found with the kept tail, which is too short to hold a whole one.
            chunk = self.buffer + data if self.buffer else data
            self.frames += chunk.count(MESSAGE)
            self.buffer = chunk[-len(MESSAGE) + 1 :]
            return
        buffer = self.buffer + data
        offset = 0
        size = len(buffer)
        now = time.time()
        latency = self.results["latency"]
        while size - offset >= 2:
            length = buffer[offset + 1] & 0x7F
            header = 2
            if length == 126:
                if size - offset < 4:
                    break
                length = int.from_bytes(buffer[offset + 2 : offset + 4], "big")
                header = 4
            elif length == 127:
                if size - offset < 10:
                    break
                length = int.from_bytes(buffer[offset + 2 : offset + 10], "big")
                header = 10
            end = offset + header + length
            if end > size:
                break
            if buffer[offset + header : offset + header + len(MESSAGE)] == MESSAGE:
                self.frames += 1
                sent = json.loads(buffer[offset + header : end])["data"].get("sent")
                if sent is not None:
                    latency.append(now - sent)
            offset = end
        self.buffer = buffer[offset:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.results["closed"] += 1
        if not self.ready.done():
            self.ready.set_result(False)


def spin(loop: asyncio.AbstractEventLoop) -> None:
    """Keep the loop polling without ever sleeping in epoll_wait."""
    loop.call_soon(spin, loop)


async def run(url: str, connections: int, stalled: int, source: str | None, spinning: bool) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path + ("?" + parts.query if parts.query else "")
    results: dict[str, Any] = {"frames": 0, "closed": 0, "latency": [], "connected": 0}
    loop = asyncio.get_running_loop()
    protocols: list[Counter] = []
    reading = range(stalled, connections)
    samples = min(len(reading), max(1, len(reading) // LATENCY_EVERY))
    sampled = set(random.sample(reading, samples))
    for index in range(connections):
        protocol = Counter(index in sampled, index < stalled, results)
        sock = socket.socket()
        if index < stalled:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        if source is not None:
            sock.bind((source, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
        await loop.create_connection(lambda p=protocol: p, sock=sock)  # type: ignore[misc]
        key = base64.b64encode(os.urandom(16)).decode()
        assert protocol.transport is not None
        protocol.transport.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        protocols.append(protocol)
        if index % 200 == 199:
            await asyncio.gather(*(p.ready for p in protocols[-200:]))
    accepted = await asyncio.gather(*(p.ready for p in protocols))
    results["connected"] = sum(accepted)
    print(json.dumps({"event": "connected", "connected": results["connected"]}), flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin.fileno(), stop.set)  # the driver closes stdin to stop us
    if spinning:
        spin(loop)
    await stop.wait()
    results["frames"] = sum(p.frames for p in protocols)
    print(json.dumps({"event": "done", **results}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--stalled", type=int, default=0)
    parser.add_argument("--source", default=None, help="local address to connect from")
    parser.add_argument(
        "--spin",
        action="store_true",
        help="poll without ever sleeping: on loopback, waking a sleeping client costs the "
        "sender's CPU, which on a real network the client's own machine would pay",
    )
    args = parser.parse_args()
    main_task = run(args.url, args.connections, args.stalled, args.source, args.spin)
    try:
        import uvloop

        uvloop.run(main_task)
    except ImportError:  # pragma: no cover
        asyncio.run(main_task)


if __name__ == "__main__":
    main()

"""Hostile clients, each as a process of its own: ``python -m bench.attacks <attack> --url ...``.

Each attack runs until SIGTERM or ``--duration``, starting again whatever the gateway closes,
and prints one JSON line with what it did and what the gateway answered. The adversarial
tests (``tests/test_attacks.py``) and the soak benchmark (``bench.soak``) run them beside a
canary (``bench.canary``) and a real gateway process.

Attacks:

* ``headers``: sockets that start the HTTP upgrade and send long header lines slowly, never
  finishing it (slowloris with a large request);
* ``silent``: sockets that connect and say nothing;
* ``pings``: WebSocket connections that send ping frames as fast as they can;
* ``fragments``: WebSocket connections that send a message as endless one-byte fragments;
* ``channels``: connections that subscribe to and unsubscribe from fresh channel names, over
  and over;
* ``bombs``: connections that send a small compressed frame inflating to 100 MB;
* ``churn``: connections that open, subscribe to fresh channel names and leave, over and over;
* ``publish``: a publisher flooding a channel through Redis (``--deep``: with envelopes
  nested too deeply to decode), with subscribers of it on the gateway;
* ``resume``: clients that subscribe to a history channel with ``since`` (offset 0, or
  ``--behind`` messages behind its top) all at once, reading their replay or (``--no-read``)
  never reading it;
* ``refresh``: connections with valid tokens (signed with ``--secret``) that send in-band
  refreshes of ``--size`` bytes with a wrong signature, as fast as the frame rate limit
  allows;
* ``deltas``: a publisher of documents of ``--size`` bytes of which ``--changed`` changes
  (all of it by default), ``--rate`` a second, on a channel whose ``--clients`` subscribers
  take Fossil deltas (each delta costs the replica's loop a search through the whole text),
  leaving and coming back every ``--churn`` seconds if given;
* ``presence``: connections that join and leave presence channels over and over, reading
  presence between;
* ``reads``: connections that read one channel's presence as fast as they may send.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import functools
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast
from urllib.parse import urlsplit

from websockets.frames import Frame, Opcode

Counts = collections.Counter[str]


def upgrade_request(url: str, extra: bytes = b"") -> bytes:
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        (
            f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        ).encode()
        + extra
        + b"\r\n"
    )


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def masked(opcode: Opcode, data: bytes = b"", fin: bool = True) -> bytes:
    return Frame(opcode, data, fin=fin).serialize(mask=True)


def close_code(data: bytes) -> int | None:
    """The code of the first close frame in ``data`` (frames from the server: unmasked)."""
    index = data.find(b"\x88")
    while index >= 0 and index + 4 <= len(data):
        if 2 <= data[index + 1] <= 125:
            return int.from_bytes(data[index + 2 : index + 4], "big")
        index = data.find(b"\x88", index + 1)
    return None


async def open_websocket(
    url: str, extra: bytes = b""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """A raw upgraded connection, or None if the gateway refused it."""
    reader, writer = await asyncio.open_connection(*address(url))
    writer.write(upgrade_request(url, extra))
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        writer.close()
        return None
    return reader, writer


def status_of(response: bytes) -> str:
    if response.startswith(b"HTTP/1.1 "):
        return response[9:12].decode(errors="replace")
    return "closed" if not response else "other"


async def forever(
    counts: Counts, stop: asyncio.Event, attempt: Callable[[], Awaitable[None]]
) -> None:
    """Run ``attempt`` again and again until ``stop``; count how each one ended."""
    while not stop.is_set():
        try:
            await attempt()
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
            counts[f"error:{type(exc).__name__}"] += 1
            await asyncio.sleep(0.05)


Use = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def upgraded(
    args: argparse.Namespace, counts: Counts, stop: asyncio.Event, use: Use, extra: bytes = b""
) -> None:
    """``--clients`` upgraded connections at a time, each handed to ``use``, then another."""

    async def one() -> None:
        opened = await open_websocket(args.url, extra)
        if opened is None:
            counts["refused"] += 1
            await asyncio.sleep(0.1)
            return
        counts["opened"] += 1
        if args.opened and counts["opened"] >= args.opened:
            stop.set()  # enough: the attack ends by itself
        await use(*opened)

    await asyncio.gather(*(forever(counts, stop, one) for _ in range(args.clients)))


async def headers(args: argparse.Namespace, counts: Counts, stop: asyncio.Event) -> None:
    """Upgrade requests that keep sending long header lines and never end."""
    line = b"X-Pad-%d: " + b"a" * args.line_bytes + b"\r\n"

    async def one() -> None:
        reader, writer = await asyncio.open_connection(*address(args.url))
        counts["opened"] += 1
        try:
            writer.write(upgrade_request(args.url)[:-2])  # without the blank line that ends it
            for n in range(args.lines):
                writer.write(line % n)
                counts["header_bytes"] += len(line)
                await writer.drain()
                try:
                    response = await asyncio.wait_for(reader.read(512), args.interval)
                except TimeoutError:
                    continue
                counts[f"answer:{status_of(response)}"] += 1
                return
            # Every line sent and still open: hold it, never finishing the request.
            counts[f"answer:{status_of(await reader.read(512))}"] += 1
        finally:
            writer.close()

    await asyncio.gather(*(forever(counts, stop, one) for _ in range(args.sockets)))


async def silent(args: argparse.Namespace, counts: Counts, stop: asyncio.Event) -> None:
    """Sockets that connect and say nothing, as many as ``--sockets``."""

    async def one() -> None:
        reader, writer = await asyncio.open_connection(*address(args.url))
        counts["opened"] += 1
        try:
            counts[f"answer:{status_of(await reader.read(512))}"] += 1
        finally:
            writer.close()

    await asyncio.gather(*(forever(counts, stop, one) for _ in range(args.sockets)))


async def flood(
    args: argparse.Namespace, counts: Counts, stop: asyncio.Event, frames: bytes, first: bytes
) -> None:
    """Upgraded connections writing ``frames`` as fast as the gateway takes them."""

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received = bytearray()

        async def read() -> None:
            while data := await reader.read(65536):
                received.extend(data[-64:] if len(received) > 4096 else data)
                if close_code(bytes(received[-4096:])) is not None:
                    return

        reading = asyncio.create_task(read())
        try:
            writer.write(first)
            while not reading.done():
                writer.write(frames)
                counts["frames_bytes"] += len(frames)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reading, 2)
            reading.cancel()
            writer.close()
        code = close_code(bytes(received))
        counts[f"close:{code}"] += 1

    await upgraded(args, counts, stop, one)


async def pings(args: argparse.Namespace, counts: Counts, stop: asyncio.Event) -> None:
    await flood(args, counts, stop, masked(Opcode.PING) * 1000, b"")


async def fragments(args: argparse.Namespace, counts: Counts, stop: asyncio.Event) -> None:
    first = masked(Opcode.TEXT, b"[", fin=False)
    await flood(args, counts, stop, masked(Opcode.CONT, b" ", fin=False) * 1000, first)


async def bombs(args: argparse.Namespace, counts: Counts, stop: asyncio.Event) -> None:
    """Connections that negotiate permessage-deflate and send one small frame that inflates
    to ``--inflated`` bytes of zeros."""
    import zlib

    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    data = compressor.compress(b"\0" * args.inflated) + compressor.flush(zlib.Z_SYNC_FLUSH)
    frame = masked(Opcode.TEXT, data[:-4])  # compressed: without the final 00 00 ff ff
    bomb = bytes([frame[0] | 0x40]) + frame[1:]  # RSV1: the frame is compressed
    counts["bomb_bytes"] = len(bomb)
    offer = b"Sec-WebSocket-Extensions: permessage-deflate\r\n"

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(bomb)
        received = b""
        while data := await reader.read(65536):
            received += data
        counts[f"close:{close_code(received)}"] += 1
        writer.close()

    await upgraded(args, counts, stop, one, offer)


async def churn(args: argparse.Namespace, counts: Counts, stop: asyncio.Event) -> None:
    """Connect, subscribe to ``--per-connection`` channel names never used before, leave."""
    names = iter(range(1 << 62))
    prefix = f"churn.{os.getpid()}."

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(args.per_connection):
            request = {"op": "subscribe", "channel": f"{prefix}{next(names)}"}
            writer.write(masked(Opcode.TEXT, json.dumps(request).encode()))
        await writer.drain()
        await reader.read(4096)
        counts["subscribes"] += args.per_connection
        writer.write(masked(Opcode.CLOSE, (1000).to_bytes(2, "big")))
        writer.close()

    await upgraded(args, counts, stop, one)


async def channels(args: argparse.Namespace, counts: Counts, stop: asyncio.Event) -> None:
    """One connection subscribing to and unsubscribing from channel names never used before,
    as fast as the gateway answers (``--clients`` such connections)."""
    names = iter(range(1 << 62))
    prefix = f"names.{os.getpid()}."
    window = 50  # requests in flight per connection

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not stop.is_set():
            batch = []
            for _ in range(window):
                channel = f"{prefix}{next(names)}"
                for op in ("subscribe", "unsubscribe"):
                    request = {"op": op, "channel": channel}
                    batch.append(masked(Opcode.TEXT, json.dumps(request).encode()))
            writer.write(b"".join(batch))
            await writer.drain()
            answers, tail = 0, b""
            while answers < 2 * window:
                data = await reader.read(65536)
                if not data:
                    counts["closed"] += 1
                    return
                # A reply may straddle two reads: look at the end of the last one too (too
                # short to hold a whole reply, so none is counted twice).
                seen, tail = tail + data, data[-10:]
                errors = seen.count(b'"op":"error"')
                answers += seen.count(b'subscribed"') + errors
                counts["errors"] += errors
                if close_code(data) is not None:
                    counts[f"close:{close_code(data)}"] += 1
                    return
            counts["names"] += window
            if args.names and counts["names"] >= args.names:
                stop.set()  # enough: the attack ends by itself
        writer.close()

    await upgraded(args, counts, stop, one)


async def resume(args: argparse.Namespace, counts: Counts, stop: asyncio.Event) -> None:
    """Clients that all resume a history channel from offset 0 at the same moment."""
    from websockets.asyncio.client import connect

    async with connect(args.url, ping_interval=None) as probe:
        await probe.send(json.dumps({"op": "subscribe", "channel": args.channel}))
        top = json.loads(await probe.recv())
    offset = max(0, top["offset"] - args.behind) if args.behind else 0
    subscribe = {
        "op": "subscribe",
        "channel": args.channel,
        "since": {"offset": offset, "epoch": top["epoch"]},
    }
    connections = []
    for _ in range(args.clients):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(address(args.url))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(upgrade_request(args.url))
        await reader.readuntil(b"\r\n\r\n")
        connections.append((reader, writer))
    counts["connected"] = len(connections)
    for _, writer in connections:
        writer.write(masked(Opcode.TEXT, json.dumps(subscribe).encode()))

    async def read(reader: asyncio.StreamReader) -> None:
        while data := await reader.read(1 << 20):
            counts["bytes_received"] += len(data)
            for answer in (b"true", b"false"):
                counts[f"recovered:{answer.decode()}"] += data.count(b'"recovered":' + answer)
        counts["closed"] += 1

    if args.no_read:
        for _, writer in connections:
            cast(asyncio.Transport, writer.transport).pause_reading()
        await stop.wait()
    else:
        readers = [asyncio.create_task(read(reader)) for reader, _ in connections]
        await stop.wait()
        for task in readers:
            task.cancel()
    for _, writer in connections:
        writer.close()


async def publish(args: argparse.Namespace, counts: Counts, stop: asyncio.Event) -> None:
    """A publisher flooding Redis channel ``--channel`` as fast as Redis takes it, with
    ``--clients`` subscribers of it on the gateway reading everything (so the replica does
    receive the flood); ``--deep`` publishes envelopes nested too deeply instead."""
    import redis.asyncio as aioredis

    from tests.harness import envelope

    subscribers = []
    for _ in range(args.clients):
        opened = await open_websocket(f"{args.url}?channels={args.channel}")
        assert opened is not None
        subscribers.append(opened)

    async def drain(reader: asyncio.StreamReader) -> None:
        while data := await reader.read(1 << 20):
            counts["bytes_received"] += len(data)

    readers = [asyncio.create_task(drain(reader)) for reader, _ in subscribers]
    if args.deep:
        payload = (
            b'{"v":1,"channel":"%s","data":' % args.channel.encode()
            + b"[" * 2000
            + b"]" * 2000
            + b',"mid":"m","ts":1}'
        )
    else:
        payload = envelope(args.channel, {"pad": "x" * args.size})
    client = aioredis.Redis.from_url(args.redis)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        while not stop.is_set():
            async with client.pipeline(transaction=False) as pipe:
                for _ in range(100):
                    pipe.publish(f"ws:{args.channel}", payload)
                await pipe.execute()
            counts["published"] += 100
            if args.rate:  # pace to --rate messages a second
                ahead = started + counts["published"] / args.rate - loop.time()
                if ahead > 0:
                    await asyncio.sleep(ahead)
    finally:
        await client.aclose()
        for task in readers:
            task.cancel()


async def deltas(args: argparse.Namespace, counts: Counts, stop: asyncio.Event) -> None:
    """Documents of ``--size`` bytes of which ``--changed`` (a share) changes each time,
    published through Redis (appended: the channel keeps history) to subscribers that asked
    for deltas; with ``--churn`` seconds, each subscriber leaves and comes back after that
    long, over and over, and checks every subscription against the protocol's rule (offsets
    following each other, the first full, each delta applying): ``problems`` counts those
    that broke it."""
    from redis.exceptions import RedisError
    from websockets.asyncio.client import connect

    from publisher import AsyncPublisher
    from tests.harness import delta_problems

    subscribed = asyncio.Event()
    request = {"op": "subscribe", "channel": args.channel, "delta": "fossil"}

    def count(frame: dict[str, Any]) -> None:
        if frame.get("op") == "message":
            counts["messages"] += 1
            counts["deltas" if frame.get("delta") else "fulls"] += 1

    async def follow() -> None:
        async with connect(args.url, ping_interval=None, max_size=None) as ws:
            while not stop.is_set():
                await ws.send(json.dumps(request))
                reply = json.loads(await ws.recv())
                if reply.get("op") != "subscribed":  # Redis down: the replica said unavailable
                    counts[f"error:{reply.get('code')}"] += 1
                    await asyncio.sleep(0.5)
                    continue
                counts["subscribed"] += 1
                if counts["subscribed"] == args.clients:
                    subscribed.set()
                frames: list[dict[str, Any]] = []
                if not args.churn:
                    async for text in ws:
                        count(json.loads(text))
                    return
                await asyncio.sleep(args.churn)
                await ws.send(json.dumps({"op": "unsubscribe", "channel": args.channel}))
                while (frame := json.loads(await ws.recv())).get("op") != "unsubscribed":
                    count(frame)
                    frames.append(frame)
                if delta_problems(reply, frames):
                    counts["problems"] += 1

    followers = [asyncio.create_task(follow()) for _ in range(args.clients)]
    document = bytearray(os.urandom(args.size // 2).hex().encode())
    changed = max(1, int(len(document) * args.changed))
    try:
        async with AsyncPublisher(args.redis) as publisher:
            await subscribed.wait()
            while not stop.is_set():
                at = int.from_bytes(os.urandom(4), "big") % (len(document) - changed + 1)
                document[at : at + changed] = os.urandom(changed // 2 + 1).hex()[:changed].encode()
                counts["published"] += 1  # (the last may be cut short by the stop)
                try:
                    await publisher.append(args.channel, {"text": document.decode()})
                except (RedisError, OSError):  # Redis restarting: on with the next
                    counts["publish_failed"] += 1
                await asyncio.sleep(1 / args.rate)
    finally:
        await asyncio.sleep(1)  # the last messages on their way
        for task in followers:
            task.cancel()
        outcomes = await asyncio.gather(*followers, return_exceptions=True)
        counts["followers_failed"] += sum(
            isinstance(o, Exception) and not isinstance(o, asyncio.CancelledError) for o in outcomes
        )


async def presence(args: argparse.Namespace, counts: Counts, stop: asyncio.Event) -> None:
    """Connections that join and leave ``--names`` presence channels (with join/leave) over
    and over, as fast as the frame rate limit lets them, reading a channel's presence between
    (``error:limit`` counts the reads beyond the presence read rate)."""
    from websockets.asyncio.client import connect

    names = args.names or 20

    async def one(worker: int) -> None:
        async with connect(args.url, ping_interval=None, max_size=None) as ws:
            round_ = 0
            while not stop.is_set():
                channels = [f"{args.channel}.{(worker + round_ + n) % 97}" for n in range(names)]
                for op in ("subscribe", "unsubscribe"):
                    for channel in channels:
                        await ws.send(json.dumps({"op": op, "channel": channel}))
                    if op == "subscribe":
                        read = {"op": "presence", "channel": channels[0], "id": round_}
                        await ws.send(json.dumps(read))
                    answered = 0
                    while answered < len(channels):
                        frame = json.loads(await ws.recv())
                        kind = frame.get("op")
                        counts[str(kind) if kind != "error" else f"error:{frame['code']}"] += 1
                        answered += kind == op + "d"
                round_ += 1
                await asyncio.sleep((2 * names + 1) / 40)  # under the frame rate limit (50)

    await asyncio.gather(
        *(forever(counts, stop, functools.partial(one, n)) for n in range(args.clients))
    )


async def reads(args: argparse.Namespace, counts: Counts, stop: asyncio.Event) -> None:
    """Connections that read the presence of ``--channel`` over and over, as fast as the
    frame rate limit lets them: each 40-byte request would bring back up to a page of
    members and cost Redis a scan."""
    from websockets.asyncio.client import connect

    async def one() -> None:
        async with connect(args.url, ping_interval=None, max_size=None) as ws:
            request = json.dumps({"op": "presence", "channel": args.channel})
            while not stop.is_set():
                await ws.send(request)
                answer = await ws.recv()
                counts["bytes_received"] += len(answer)
                kind = json.loads(answer).get("op")
                counts["pages" if kind == "presence" else "refused"] += 1
                await asyncio.sleep(1 / 40)  # under the frame rate limit (50)

    await asyncio.gather(*(forever(counts, stop, one) for _ in range(args.clients)))


async def refresh(args: argparse.Namespace, counts: Counts, stop: asyncio.Event) -> None:
    """Refreshes with large forged tokens: each would be decoded whole before its signature
    is checked."""
    import jwt

    def signed(key: str, pad: int = 0) -> str:
        claims = {"sub": "mallory", "exp": int(time.time()) + 3600, "pad": "x" * pad}
        return jwt.encode(claims, key, algorithm="HS256")

    # base64 makes 4 characters of 3 bytes: a token of about --size characters.
    forged = signed("not-the-secret-not-the-secret-0123", max(0, args.size * 3 // 4 - 200))
    request = masked(Opcode.TEXT, json.dumps({"op": "refresh", "token": forged}).encode())

    async def use(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def read() -> None:
            while data := await reader.read(65536):
                counts["refused"] += data.count(b"refresh refused")
                counts["limited"] += data.count(b'"code":"limit"')
                code = close_code(data)
                if code is not None:
                    counts[f"close:{code}"] += 1
            counts["closed"] += 1

        task = asyncio.create_task(read())
        try:
            while not task.done() and not stop.is_set():
                writer.write(request)
                counts["sent"] += 1
                await asyncio.sleep(1 / 40)  # under the frame rate limit (50)
        finally:
            task.cancel()
            writer.close()

    extra = f"Authorization: Bearer {signed(args.secret)}\r\n".encode()
    await upgraded(args, counts, stop, use, extra)


ATTACKS = {
    "bombs": bombs,
    "headers": headers,
    "silent": silent,
    "pings": pings,
    "publish": publish,
    "fragments": fragments,
    "channels": channels,
    "churn": churn,
    "resume": resume,
    "deltas": deltas,
    "refresh": refresh,
    "presence": presence,
    "reads": reads,
}


async def main_async(args: argparse.Namespace) -> None:
    counts: Counts = collections.Counter()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.call_later(args.duration, stop.set)
    started = time.monotonic()
    attack = asyncio.create_task(ATTACKS[args.attack](args, counts, stop))
    print("started", flush=True)
    await asyncio.wait([attack, asyncio.create_task(stop.wait())], return_when="FIRST_COMPLETED")
    attack.cancel()
    [outcome] = await asyncio.gather(attack, return_exceptions=True)
    if isinstance(outcome, Exception):  # the attack itself broke: say so, do not hide it
        counts[f"failed:{type(outcome).__name__}: {outcome}"] += 1
    print(json.dumps({"seconds": round(time.monotonic() - started, 2), **counts}), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.attacks", description=__doc__)
    parser.add_argument("attack", choices=sorted(ATTACKS))
    parser.add_argument("--url", required=True, help="ws://host:port/ws")
    parser.add_argument("--duration", type=float, default=3600.0)
    parser.add_argument("--sockets", type=int, default=1000, help="headers, silent")
    parser.add_argument("--line-bytes", type=int, default=8000, help="headers")
    parser.add_argument("--lines", type=int, default=120, help="headers")
    parser.add_argument("--interval", type=float, default=0.05, help="headers: between lines")
    parser.add_argument("--clients", type=int, default=10, help="pings, fragments, churn, resume")
    parser.add_argument("--per-connection", type=int, default=20, help="churn")
    parser.add_argument(
        "--names",
        type=int,
        default=0,
        help="channels: stop after this many; presence: channels a round (default 20)",
    )
    parser.add_argument(
        "--opened", type=int, default=0, help="stop after opening this many connections"
    )
    parser.add_argument("--inflated", type=int, default=100 << 20, help="bombs: bytes inflated")
    parser.add_argument("--channel", default="h.storm", help="resume, publish")
    parser.add_argument("--redis", help="publish, deltas: the Redis URL to publish through")
    parser.add_argument(
        "--size",
        type=int,
        default=100,
        help="publish: bytes of padding; deltas: of a document; refresh: of a token",
    )
    parser.add_argument("--deep", action="store_true", help="publish: malformed, too deep")
    parser.add_argument(
        "--rate", type=float, default=0, help="publish, deltas: a second (publish: 0, no limit)"
    )
    parser.add_argument("--no-read", action="store_true", help="resume")
    parser.add_argument("--secret", default="", help="refresh: the gateway's JWT secret")
    parser.add_argument("--changed", type=float, default=1.0, help="deltas: share changed")
    parser.add_argument("--churn", type=float, default=0, help="deltas: seconds subscribed")
    parser.add_argument(
        "--behind", type=int, default=0, help="resume: this many messages behind (0: offset 0)"
    )
    return parser.parse_args(argv)


def main() -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main_async(parse_args()))
    sys.stdout.flush()


if __name__ == "__main__":
    main()

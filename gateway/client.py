"""An asyncio client for the gateway that reconnects by itself and resumes where it left off.

>>> async with Client("ws://localhost:8765/ws", ["news"]) as client:
...     async for event in client:
...         match event:
...             case Message(channel=channel, data=data):
...                 print(channel, data)
...             case Resync(channel=channel):
...                 ...  # messages of `channel` were missed: reload its state elsewhere

One task per connection reads every frame. When the connection drops, the client waits a
capped exponential backoff with full jitter and reconnects (to the next URL, if several were
given); the backoff resets only once a connection has stayed up for ``stable_after`` seconds,
so a server that accepts and drops at once is not hammered. On reconnecting it subscribes
again, giving each history channel the position of the last message it received, and the
gateway replays what it missed. When that is impossible (the gateway answers
``recovered: false``, the offsets jump, or the epoch changes) the iteration yields a
:class:`Resync` for the channel before its next message. Messages are never yielded twice.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from gateway import fossil
from gateway.backoff import full_jitter
from gateway.history import EMPTY_EPOCH

__all__ = ["Client", "ClientError", "Event", "Message", "Resync", "Unsubscribed"]

log = logging.getLogger("gateway.client")

Token = str | Callable[[], str | Awaitable[str]]


@dataclass(frozen=True, slots=True)
class Message:
    channel: str
    data: Any
    mid: str
    ts: int  # publish time, unix ms
    offset: int | None = None  # history channels only
    epoch: str | None = None


@dataclass(frozen=True, slots=True)
class Resync:
    """Messages of ``channel`` were missed and cannot be replayed.

    ``reason``: ``not_recovered`` (the gateway could not replay from the last position: too
    old, or the channel's history was lost), ``gap`` (offsets jumped) or ``epoch`` (the
    channel's history restarted).
    """

    channel: str
    reason: str


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    """The gateway took ``channel`` away: ``reason`` ``forbidden`` when a refreshed token no
    longer allows it. The client does not subscribe to it again."""

    channel: str
    reason: str


Event = Message | Resync | Unsubscribed


class ClientError(Exception):
    """A request the gateway refused (``code`` as in the protocol), or a handshake refused
    for good (401, 403, 404 with a fixed token)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


_FATAL_STATUS = (401, 403, 404)


class _Closed(Exception):
    """Put in the event queue by close(): the iteration ends there."""


_CLOSED = _Closed()


class Client:
    def __init__(
        self,
        url: str | Sequence[str],
        channels: Iterable[str] = (),
        *,
        token: Token | None = None,
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
        stable_after: float = 10.0,
        queue_size: int = 1024,
        open_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        refresh_before: float = 30.0,
        deltas: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        """``token``: a JWT, or a callable (sync or async) that returns a fresh one; with a
        callable, a connection sends a new token in-band (``refresh``) ``refresh_before``
        seconds before the current one expires (at half its remaining life if that is
        sooner), so it is never closed with 4001."""
        self.urls = [url] if isinstance(url, str) else list(url)
        self.channels: dict[str, None] = dict.fromkeys(channels)  # ordered set
        self.token = token
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.stable_after = stable_after
        self.open_timeout = open_timeout
        self.ping_interval = ping_interval
        self.refresh_before = refresh_before
        #: Ask for Fossil deltas (where the gateway allows them); applied here, transparently:
        #: every message after a subscription's offset comes as text (the first full), the
        #: replayed ones and a state channel's latest as ordinary frames.
        self.deltas = deltas
        #: Each delta channel's last message as text: what the next delta applies to.
        self._bases: dict[str, tuple[int, str, bytes]] = {}
        self._rng = rng or random.Random()
        #: The last message received of each history channel: (offset, epoch).
        self.positions: dict[str, tuple[int, str]] = {}
        self.connects = 0  # connections opened, the first one included
        self.connected = asyncio.Event()
        self._events: asyncio.Queue[Event | BaseException] = asyncio.Queue(queue_size)
        self._ws: ClientConnection | None = None
        self._ids = itertools.count(1)
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    # Life

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="gateway client")

    async def close(self) -> None:
        """Close the connection and stop reconnecting; an iteration in progress ends."""
        self._closing = True
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        while True:  # wake the iteration, even if the queue is full of unread events
            try:
                self._events.put_nowait(_CLOSED)
                break
            except asyncio.QueueFull:
                self._events.get_nowait()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            event = await self._events.get()
            if event is _CLOSED:
                return
            if isinstance(event, BaseException):
                raise event
            yield event

    # Requests

    async def subscribe(self, channel: str) -> None:
        """Add ``channel``; subscribed now if connected, and on every reconnect."""
        self.channels[channel] = None
        if self._ws is not None:
            await self._send_subscribe(self._ws, channel)

    async def unsubscribe(self, channel: str) -> None:
        self.channels.pop(channel, None)
        self.positions.pop(channel, None)
        if self._ws is not None:
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send(json.dumps({"op": "unsubscribe", "channel": channel}))

    async def publish(self, channel: str, data: Any, *, timeout: float = 10.0) -> None:
        """Publish through the gateway (where it allows clients to); raise ClientError if
        refused, ConnectionError if not connected."""
        ws = self._ws
        if ws is None:
            raise ConnectionError("not connected to the gateway")
        payload = {"op": "publish", "channel": channel, "data": data}
        answer = await self._request(ws, payload, timeout)
        if answer.get("op") == "error":
            raise ClientError(answer.get("code", "error"), answer.get("message", ""))

    async def _request(
        self, ws: ClientConnection, payload: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        """Send a request with a fresh id; its reply (or ``error``) as a dict."""
        request_id = next(self._ids)
        reply = asyncio.get_running_loop().create_future()
        self._replies[request_id] = reply
        try:
            await ws.send(json.dumps({**payload, "id": request_id}))
            async with asyncio.timeout(timeout):
                answer: dict[str, Any] = await reply
                return answer
        except ConnectionClosed as exc:
            raise ConnectionError(f"connection lost: {exc}") from None
        finally:
            self._replies.pop(request_id, None)

    async def _refresher(self, ws: ClientConnection, token: str) -> None:
        """Keep this connection's token fresh until the connection ends."""
        expires_at = _expiry(token)
        while expires_at is not None:
            left = expires_at - time.time()
            await asyncio.sleep(max(0.0, left - min(self.refresh_before, left / 2)))
            try:
                fresh = await self._token()
                answer = await self._request(ws, {"op": "refresh", "token": fresh}, 10)
            except (ConnectionError, TimeoutError):
                return  # the connection is going; the next one starts with a fresh token
            if answer.get("op") == "refreshed" and isinstance(answer.get("exp"), int | float):
                expires_at = float(answer["exp"])
                continue
            # Refused (or no exp): try again shortly while the current token lasts; at its
            # expiry the gateway closes with 4001 and the reconnect takes a new token.
            log.warning("token refresh refused: %s", answer.get("message", answer))
            await asyncio.sleep(max(0.5, min(5.0, (expires_at - time.time()) / 2)))
            if time.time() >= expires_at:
                return

    # The connection

    async def _run(self) -> None:
        attempt = 0
        loop = asyncio.get_running_loop()
        for number in itertools.count():
            url = self.urls[number % len(self.urls)]
            opened_at: float | None = None
            try:
                headers = {}
                token = await self._token() if self.token is not None else None
                if token is not None:
                    headers["Authorization"] = f"Bearer {token}"
                async with connect(
                    url,
                    additional_headers=headers,
                    open_timeout=self.open_timeout,
                    ping_interval=self.ping_interval,
                    max_size=None,
                ) as ws:
                    opened_at = loop.time()
                    self.connects += 1
                    self._ws = ws
                    self.connected.set()
                    refresher = None
                    if token is not None and callable(self.token):
                        refresher = asyncio.create_task(self._refresher(ws, token))
                    try:
                        for channel in list(self.channels):
                            await self._send_subscribe(ws, channel)
                        async for frame in ws:
                            await self._handle(ws, frame)
                    finally:
                        if refresher is not None:
                            refresher.cancel()
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status in _FATAL_STATUS and not callable(self.token):
                    await self._events.put(ClientError(f"http_{status}", str(exc)))
                    return
                log.info("handshake refused (%d); reconnecting", status)
            except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError) as exc:
                log.info("connection to %s lost: %s", url, exc)
            finally:
                self._ws = None
                self.connected.clear()
                for reply in self._replies.values():
                    if not reply.done():
                        reply.set_exception(ConnectionError("connection lost"))
            if self._closing:
                return
            if opened_at is not None and loop.time() - opened_at >= self.stable_after:
                attempt = 0  # it stayed up: a fresh failure starts the backoff over
            delay = full_jitter(attempt, self.backoff_min, self.backoff_max, self._rng)
            attempt += 1
            await asyncio.sleep(delay)

    async def _token(self) -> str:
        token = self.token
        if callable(token):
            value = token()
            return await value if isinstance(value, Awaitable) else value
        assert token is not None
        return token

    async def _send_subscribe(self, ws: ClientConnection, channel: str) -> None:
        request: dict[str, Any] = {"op": "subscribe", "channel": channel}
        position = self.positions.get(channel)
        if position is not None:
            request["since"] = {"offset": position[0], "epoch": position[1]}
        if self.deltas:
            request["delta"] = "fossil"
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps(request))

    async def _handle(self, ws: ClientConnection, frame: str | bytes) -> None:
        reply = json.loads(frame)
        op = reply.get("op")
        if op == "message":
            if reply.get("delta") is not None and not self._undelta(reply):
                # A delta it cannot apply (it should not happen: the gateway sends the full
                # text whenever it is unsure): reconnect and resume from the last message.
                await ws.close(1000, "cannot apply a delta")
                return
            await self._message(reply)
        elif op == "subscribed":
            channel = reply["channel"]
            if reply.get("recovered") is False:
                await self._events.put(Resync(channel, "not_recovered"))
            if reply.get("epoch") is not None:
                if reply.get("latest"):  # the channel's newest message, at offset, follows
                    self.positions[channel] = (reply["offset"] - 1, reply["epoch"])
                elif reply.get("recovered") is not True:
                    self.positions[channel] = (reply["offset"], reply["epoch"])
        elif op == "unsubscribed" and reply.get("reason") is not None:
            # Not asked for: a refreshed token no longer allows the channel.
            channel = reply["channel"]
            self.channels.pop(channel, None)
            self.positions.pop(channel, None)
            await self._events.put(Unsubscribed(channel, reply["reason"]))
        elif op in ("published", "refreshed", "error") and reply.get("id") in self._replies:
            future = self._replies[reply["id"]]
            if not future.done():
                future.set_result(reply)
        elif op == "error":
            if reply.get("code") == "unavailable":
                # That replica lost its backplane: try again, maybe elsewhere.
                await ws.close(1000, "backplane unavailable")
            else:
                await self._events.put(ClientError(reply.get("code", ""), reply.get("message")))

    def _undelta(self, frame: dict[str, Any]) -> bool:
        """Turn a delta subscription's frame (``data``: the text, or a Fossil delta against
        the last one) into a plain one; False if the delta does not apply."""
        channel, offset, epoch = frame["channel"], frame["offset"], frame["epoch"]
        text = frame["data"].encode()
        if frame["delta"]:
            base = self._bases.pop(channel, None)
            if base is None or base[:2] != (offset - 1, epoch):
                return False
            try:
                text = fossil.apply(base[2], text)
            except fossil.DeltaError:
                return False
        self._bases[channel] = (offset, epoch, text)
        frame["data"] = json.loads(text)
        return True

    async def _message(self, frame: dict[str, Any]) -> None:
        channel = frame["channel"]
        offset, epoch = frame.get("offset"), frame.get("epoch")
        if offset is not None and epoch is not None:
            last = self.positions.get(channel)
            if last == (0, EMPTY_EPOCH):
                last = (0, epoch)  # subscribed before the channel had history: its start
            if last is not None:
                if epoch == last[1] and offset <= last[0]:
                    return  # already yielded
                if epoch != last[1]:
                    await self._events.put(Resync(channel, "epoch"))
                elif offset > last[0] + 1:
                    await self._events.put(Resync(channel, "gap"))
            self.positions[channel] = (offset, epoch)
        await self._events.put(
            Message(
                channel, frame.get("data"), frame.get("mid", ""), frame.get("ts", 0), offset, epoch
            )
        )


def _expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, read without verifying it (the gateway verifies; the
    client only needs to know when to refresh), or None."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None

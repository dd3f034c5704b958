"""Turns on the event loop for work that could run on: one thread serves every client."""

from __future__ import annotations

import asyncio
import time

__all__ = ["Turns"]


class Turns:
    """``await turns.take()`` after each piece of work yields to the loop once ``seconds``
    have passed since the last turn: a flood from Redis, or a history page of megabytes,
    never keeps the clients waiting longer than that. The backplane's readers take 5 ms
    turns, more than fan-out's 2 ms, so the replica keeps up with Redis while it sheds what
    it cannot fan out."""

    __slots__ = ("_until", "seconds")

    def __init__(self, seconds: float = 0.005) -> None:
        self.seconds = seconds
        self._until = time.perf_counter() + seconds

    async def take(self) -> None:
        if time.perf_counter() >= self._until:
            await asyncio.sleep(0)
            self._until = time.perf_counter() + self.seconds

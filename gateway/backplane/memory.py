"""In-process backplane: one replica, nothing to install, messages never leave the process."""

from __future__ import annotations

from gateway.backplane.base import Backplane, OnMessage

__all__ = ["MemoryBackplane"]


class MemoryBackplane(Backplane):
    name = "memory"

    def __init__(self, on_message: OnMessage) -> None:
        super().__init__(on_message)
        self._channels: set[str] = set()

    @property
    def connected(self) -> bool:
        return True

    @property
    def subscribed_channels(self) -> int:
        return len(self._channels)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self._channels.clear()

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)

    async def publish(self, channel: str, envelope: bytes) -> int:
        if channel not in self._channels:
            return 0
        self.on_message(channel, envelope)
        return 1

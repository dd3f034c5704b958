"""The :class:`Backplane` interface that the hub talks to."""

from __future__ import annotations

import abc
from collections.abc import Callable

__all__ = ["Backplane", "BackplaneUnavailable", "OnMessage"]

#: Called with (channel without prefix, envelope bytes) for every message received. It must
#: not block: the backplane's reader goes straight back to reading when it returns.
OnMessage = Callable[[str, bytes], None]


class BackplaneUnavailable(Exception):
    """The backplane is down or did not answer in time; the request can be retried later."""


class Backplane(abc.ABC):
    #: Short name for logs and metrics: ``memory`` or ``redis``.
    name: str
    #: Connections re-established after a loss, and the total time spent disconnected.
    reconnects: int = 0
    outage_seconds: float = 0.0

    def __init__(self, on_message: OnMessage) -> None:
        self.on_message = on_message

    @property
    @abc.abstractmethod
    def subscribed_channels(self) -> int:
        """How many channels the backplane receives for this replica."""

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """True while messages published now would reach this replica."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Begin connecting. Returns without waiting for the connection to succeed."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect and stop every task of the backplane."""

    @abc.abstractmethod
    async def subscribe(self, channel: str) -> None:
        """Start receiving ``channel``; return once messages published from now on arrive.

        Raises :class:`BackplaneUnavailable` when that cannot be confirmed.
        """

    @abc.abstractmethod
    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving ``channel``. Never raises: a lost connection drops it anyway."""

    @abc.abstractmethod
    async def publish(self, channel: str, envelope: bytes) -> int:
        """Publish an encoded envelope; return how many replicas received it.

        Raises :class:`BackplaneUnavailable` when the backplane is down.
        """

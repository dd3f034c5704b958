"""Where history channels keep their messages in Redis, and the two scripts that touch them.

A channel ``C`` whose name matches the history patterns keeps, besides its pub/sub channel
``<prefix>C``, two keys:

* ``{<prefix>C}:history``: a stream of the channel's last messages; entry id ``0-<offset>``,
  fields ``e`` (the envelope as published) and ``t`` (Redis time it was appended, unix ms);
* ``{<prefix>C}:meta``: a hash with the channel's ``epoch``, its last ``offset`` and, once a
  publisher gave one, its ``version``;
* ``{<prefix>C}:idempotency`` and ``{<prefix>C}:idempotency:exp``: the idempotency keys seen
  within their window (key -> offset, and key -> expiry in unix ms), once a publisher gave one.

The ``{...}`` hash tag puts both keys in the slot of the pub/sub channel ``<prefix>C`` on a
Redis Cluster (a channel with a hash tag of its own, ``room{7}``, keeps it: the keys are
``<prefix>room{7}:history`` and ``<prefix>room{7}:meta``).

:data:`APPEND_LUA` checks, numbers, stores and publishes a message in one atomic step, so
every subscriber sees offsets in order and the stream holds everything that was published. A
publisher may give an idempotency key (a retry within the window is not stored twice: the
reply gives the first offset) or a version (a message whose version is not above the
channel's is dropped, reported ``stale``); both are forgotten with the channel's epoch.
If the meta hash is lost (a Redis restart without persistence, a FLUSHALL, its retention ran
out) the next append picks a new epoch and offsets restart at 1; clients holding the old epoch
learn that their position is gone. The scripts are files (``publisher/lua/``): publishers in
other languages ``EVAL`` ``history_append.lua`` with the keys and arguments its header and
docs/protocol.md list.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass
from fnmatch import fnmatchcase
from importlib import resources
from typing import Any

__all__ = [
    "APPEND_LUA",
    "READ_LUA",
    "Appended",
    "HistoryPolicy",
    "Outcome",
    "append_keys",
    "hash_tag",
    "history_keys",
    "new_epoch",
    "numbered",
]


def hash_tag(name: str) -> str | None:
    """The part of ``name`` Redis Cluster hashes, if it has a hash tag: what lies between
    the first ``{`` and the first ``}`` after it, when that is not empty."""
    start = name.find("{")
    if start < 0:
        return None
    end = name.find("}", start + 1)
    return name[start + 1 : end] if end > start + 1 else None


def history_keys(prefix: str, channel: str) -> tuple[str, str]:
    """The stream and meta keys of ``channel``, in the slot of its pub/sub channel: the
    channel's own hash tag when it has one, else the whole channel name as the tag."""
    name = prefix + channel
    base = name if hash_tag(name) is not None else "{" + name + "}"
    return base + ":history", base + ":meta"


def append_keys(prefix: str, channel: str) -> list[str]:
    """KEYS of :data:`APPEND_LUA`: the stream, the meta hash, and the two keys that remember
    idempotency keys (a hash of key -> offset and a sorted set of their expiries)."""
    stream, meta = history_keys(prefix, channel)
    base = meta[: -len(":meta")]
    return [stream, meta, base + ":idempotency", base + ":idempotency:exp"]


class Outcome(enum.Enum):
    """What the append script did with a message."""

    PUBLISHED = "published"  # numbered, stored and sent
    DUPLICATE = "duplicate"  # its idempotency key was seen within the window: nothing done
    STALE = "stale"  # its version is not above the channel's: nothing done


@dataclass(frozen=True, slots=True)
class Appended:
    """The append script's reply: the message's offset and epoch (a duplicate's: the first
    message's; a stale one's: the channel's current top), and how many gateway connections
    received it (0 unless published)."""

    offset: int
    epoch: str
    receivers: int
    outcome: Outcome

    @classmethod
    def from_reply(cls, reply: list[Any]) -> Appended:
        offset, epoch, receivers, *rest = reply
        outcome = rest[0] if rest else b"published"  # a script from before outcomes
        text = outcome.decode() if isinstance(outcome, bytes) else str(outcome)
        epoch = epoch.decode() if isinstance(epoch, bytes) else str(epoch)
        return cls(int(offset), epoch, int(receivers), Outcome(text))


def numbered(envelope: bytes, offset: int, epoch: str) -> bytes:
    """The version 2 envelope of a version 1 one: what :data:`APPEND_LUA` stores and sends."""
    if not envelope.startswith(b'{"v":1,') or not envelope.endswith(b"}"):
        raise ValueError('envelope must be compact JSON starting with {"v":1,')
    return b'{"v":2,%s,"offset":%d,"epoch":"%s"}' % (envelope[7:-1], offset, epoch.encode())


def new_epoch() -> str:
    return secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class HistoryPolicy:
    """Which channels keep history, and how much of it.

    ``state`` channels (a subset of ``patterns``) carry state rather than a log: their
    subscribers get the latest message right after subscribing.
    """

    patterns: tuple[str, ...] = ()
    size: int = 1000  # messages kept per channel
    ttl: float = 300.0  # seconds a message is kept
    retention: float = 86400.0  # seconds a silent channel keeps its stream and epoch
    idempotency_window: float = 300.0  # seconds an idempotency key is remembered
    state: tuple[str, ...] = ()

    def applies(self, channel: str) -> bool:
        return any(fnmatchcase(channel, pattern) for pattern in self.patterns)

    def is_state(self, channel: str) -> bool:
        return any(fnmatchcase(channel, pattern) for pattern in self.state)

    @property
    def retention_ms(self) -> int:
        return int(max(self.retention, self.ttl) * 1000)

    def append_args(
        self,
        pubsub_channel: str,
        envelope: bytes,
        *,
        sharded: bool = False,
        idempotency_key: str | None = None,
        version: int | None = None,
    ) -> list[str | bytes | int]:
        """ARGV of :data:`APPEND_LUA` for a version 1 ``envelope``; ``sharded`` publishes
        with SPUBLISH (Redis Cluster), whose channel is in the keys' slot by construction."""
        return [
            pubsub_channel,
            envelope,
            self.size,
            int(self.ttl * 1000),
            self.retention_ms,
            new_epoch(),
            "SPUBLISH" if sharded else "PUBLISH",
            idempotency_key or "",
            int(self.idempotency_window * 1000),
            "" if version is None else version,
        ]

    @staticmethod
    def read_args(after: int, count: int, max_bytes: int) -> list[int]:
        """ARGV of :data:`READ_LUA`."""
        return [after, count, max_bytes]


def _script(name: str) -> str:
    return (resources.files("publisher") / "lua" / name).read_text(encoding="utf-8")


#: Checks, numbers, stores and publishes one message (publisher/lua/history_append.lua, whose
#: header and docs/protocol.md give its keys, arguments and replies).
APPEND_LUA = _script("history_append.lua")
#: The gateways' atomic read of a channel's newest entries (publisher/lua/history_read.lua).
READ_LUA = _script("history_read.lua")

"""Who may subscribe and publish to which channels: glob patterns, matched case-sensitively.

Pure. Anonymous clients get the patterns of the settings ``anonymous_channels`` and
``anonymous_publish``.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

__all__ = ["Access"]


@dataclass(frozen=True, slots=True)
class Access:
    subscribe: tuple[str, ...]
    publish: tuple[str, ...] = ()

    def can_subscribe(self, channel: str) -> bool:
        return any(fnmatchcase(channel, pattern) for pattern in self.subscribe)

    def can_publish(self, channel: str) -> bool:
        return any(fnmatchcase(channel, pattern) for pattern in self.publish)

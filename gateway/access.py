"""Who may subscribe and publish to which channels: glob patterns, matched case-sensitively,
plus the channels a token grants by name and the personal-channel rule. Pure.

Anonymous clients get the patterns of the settings ``anonymous_channels`` and
``anonymous_publish``. A channel whose name starts with ``@`` is personal: ``@<sub>`` belongs
to the user whose token has that ``sub``, and nobody else may subscribe to it, whatever their
patterns say (``*`` included).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from publisher.envelope import is_valid_channel

__all__ = ["PERSONAL_PREFIX", "Access", "personal_channel"]

PERSONAL_PREFIX = "@"


def personal_channel(subject: str | None) -> str | None:
    """The personal channel of a token's ``sub``; None if anonymous or if ``@<sub>`` is not a
    valid channel name (too long, or characters channel names cannot have)."""
    if subject is None:
        return None
    channel = PERSONAL_PREFIX + subject
    return channel if is_valid_channel(channel) else None


@dataclass(frozen=True, slots=True)
class Access:
    subscribe: tuple[str, ...]
    publish: tuple[str, ...] = ()
    #: Channels allowed by name whatever the patterns: the token's ``subs`` and the user's own
    #: personal channel.
    granted: frozenset[str] = frozenset()

    def can_subscribe(self, channel: str) -> bool:
        if channel in self.granted:
            return True
        if channel.startswith(PERSONAL_PREFIX):
            return False  # someone else's personal channel
        return any(fnmatchcase(channel, pattern) for pattern in self.subscribe)

    def can_publish(self, channel: str) -> bool:
        return any(fnmatchcase(channel, pattern) for pattern in self.publish)

"""Who may subscribe and publish to which channels: glob patterns, matched case-sensitively,
plus the channels a token grants by name and the personal-channel rule. Pure.

Anonymous clients get the patterns of the settings ``anonymous_channels`` and
``anonymous_publish``. A channel whose name starts with ``@`` is personal: ``@<sub>`` belongs
to the user whose token has that ``sub``, and nobody else may subscribe to it, whatever their
patterns say (``*`` included). A channel whose name starts with ``@@`` is the gateway's own
(:data:`publisher.control.RESERVED_PREFIX`): no client may subscribe or publish there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fnmatch import fnmatchcase

from publisher.control import RESERVED_PREFIX
from publisher.envelope import is_valid_channel

__all__ = ["PERSONAL_PREFIX", "Access", "personal_channel"]

PERSONAL_PREFIX = "@"


def personal_channel(subject: str | None) -> str | None:
    """The personal channel of a token's ``sub``; None if anonymous or if ``@<sub>`` is not a
    valid channel name (too long, or characters channel names cannot have) or would be a
    reserved one (a ``sub`` starting with ``@``)."""
    if subject is None:
        return None
    channel = PERSONAL_PREFIX + subject
    if channel.startswith(RESERVED_PREFIX) or not is_valid_channel(channel):
        return None
    return channel


@dataclass(frozen=True, slots=True)
class Access:
    subscribe: tuple[str, ...]
    publish: tuple[str, ...] = ()
    #: Channels allowed by name whatever the patterns: the token's ``subs`` and the user's own
    #: personal channel.
    granted: frozenset[str] = frozenset()
    #: Channels a service put the connection on (a control request): allowed whatever the
    #: token says, through refreshes, until a service takes the connection off again.
    placed: frozenset[str] = frozenset()
    #: Patterns of the channels whose presence the connection may read (if they have it).
    presence: tuple[str, ...] = ()
    #: The user's own personal channel (None: anonymous, or a sub that makes none).
    own: str | None = None

    def can_subscribe(self, channel: str) -> bool:
        if channel.startswith(RESERVED_PREFIX):
            return False  # whatever a token grants: the replica's own channels
        if channel in self.granted or channel in self.placed:
            return True
        if channel.startswith(PERSONAL_PREFIX):
            return False  # someone else's personal channel
        return any(fnmatchcase(channel, pattern) for pattern in self.subscribe)

    def placing(self, channel: str) -> Access:
        return replace(self, placed=self.placed | {channel})

    def unplacing(self, channel: str) -> Access:
        return replace(self, placed=self.placed - {channel}) if channel in self.placed else self

    def keeping_placed(self, previous: Access) -> Access:
        """These rights (a refreshed token's) with the channels ``previous`` was placed on."""
        return replace(self, placed=previous.placed) if previous.placed else self

    def can_read_presence(self, channel: str) -> bool:
        if channel.startswith(RESERVED_PREFIX):
            return False
        if channel.startswith(PERSONAL_PREFIX) and channel != self.own:
            # Who is connected to another user's personal channel, and their info, is
            # theirs: whatever the patterns say (and whoever subs or a service put there).
            return False
        return any(fnmatchcase(channel, pattern) for pattern in self.presence)

    def can_publish(self, channel: str) -> bool:
        if channel.startswith(RESERVED_PREFIX):
            return False  # a client's publish there would be a control request
        return any(fnmatchcase(channel, pattern) for pattern in self.publish)

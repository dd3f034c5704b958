"""The connections this replica holds, by user (the token's ``sub``).

It serves the per-user connection limit (GATEWAY_MAX_CONNECTIONS_PER_USER) and the control
requests that name a user. Anonymous connections are not in it. A user leaves the map with
their last connection, so it never holds more entries than there are connections.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

__all__ = ["Users"]


class _HasSubject(Protocol):
    @property
    def subject(self) -> str | None: ...


S = TypeVar("S", bound=_HasSubject)


class Users(Generic[S]):
    __slots__ = ("_by_user",)

    def __init__(self) -> None:
        # A list, not a set: most users have one connection, and a one-item list costs a
        # third of an empty set.
        self._by_user: dict[str, list[S]] = {}

    def __len__(self) -> int:
        """How many distinct users are connected."""
        return len(self._by_user)

    def add(self, session: S) -> None:
        if session.subject is not None:
            self._by_user.setdefault(session.subject, []).append(session)

    def discard(self, session: S) -> None:
        subject = session.subject
        if subject is None:
            return
        held = self._by_user.get(subject)
        if held is not None and session in held:
            held.remove(session)
            if not held:
                del self._by_user[subject]

    def count(self, subject: str) -> int:
        return len(self._by_user.get(subject, ()))

    def sessions(self, subject: str) -> list[S]:
        """A copy: the caller may close them while going through it."""
        return list(self._by_user.get(subject, ()))

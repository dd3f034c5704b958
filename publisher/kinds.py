"""Which channels keep history, from one place: the gateways say it in Redis, publishers read it.

A history channel works only if every publisher appends its messages (publisher.history);
one that was not told publishes unnumbered messages, and resuming silently degrades. So
every gateway replica writes its history settings as JSON to ``<prefix>@@channels`` (every
:data:`REFRESH` seconds, expiring after :data:`TTL_MS` unless renewed), and publishers follow
what they find there, whatever they were configured with; a difference is logged. Replicas
configured differently from each other see it too: each write returns what the key held.

The document (``v`` 1)::

    {"v": 1, "history": {"patterns": ["prices.*", "scores.*"], "size": 1000, "ttl": 300.0,
                         "retention": 86400.0, "idempotency_window": 300.0},
     "state": {"patterns": ["scores.*"]}}

``patterns`` are globs (``fnmatch``, case-sensitive); ``size`` is messages kept per channel,
the others seconds. Every channel matching ``history.patterns`` is appended to; ``state``
names those of them that are state channels (the gateways give subscribers their latest
message: publishers need not care). Readers ignore fields they do not know.
"""

from __future__ import annotations

import logging

import msgspec

from publisher.history import HistoryPolicy

__all__ = ["KINDS_KEY", "REFRESH", "TTL_MS", "ChannelKinds", "kinds_document", "parse_kinds"]

#: Where the gateways write the document, after the channel prefix (no channel starts "@@").
KINDS_KEY = "@@channels"
#: Seconds between a replica's writes, and between a publisher's reads.
REFRESH = 10.0
#: The document expires unless a replica renews it: gone with the last gateway.
TTL_MS = 60_000

log = logging.getLogger("wsgateway.publisher")


class _History(msgspec.Struct, frozen=True):
    patterns: list[str]
    size: int
    ttl: float
    retention: float
    idempotency_window: float = 300.0


class _State(msgspec.Struct, frozen=True):
    patterns: list[str]


class _Document(msgspec.Struct, frozen=True):
    v: int
    history: _History
    state: _State = _State([])


def kinds_document(policy: HistoryPolicy) -> bytes:
    """The document a replica writes for its history ``policy``."""
    history = _History(
        list(policy.patterns), policy.size, policy.ttl, policy.retention, policy.idempotency_window
    )
    return msgspec.json.encode(_Document(1, history, _State(list(policy.state))))


def parse_kinds(document: bytes) -> HistoryPolicy:
    """The history policy a document says; ValueError if it is not one this code reads."""
    try:
        parsed = msgspec.json.decode(document, type=_Document)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a channel kinds document: {exc}") from None
    except RecursionError:
        raise ValueError("not a channel kinds document: nested too deeply") from None
    if parsed.v != 1:
        raise ValueError(f"channel kinds document version {parsed.v}, this publisher reads 1")
    history = parsed.history
    return HistoryPolicy(
        tuple(history.patterns),
        size=history.size,
        ttl=history.ttl,
        retention=history.retention,
        idempotency_window=history.idempotency_window,
        state=tuple(parsed.state.patterns),
    )


class ChannelKinds:
    """What one publisher follows: the gateways' document while there is one, else its own
    configuration. Pure: the publisher reads the key when :meth:`due` and hands it over."""

    __slots__ = ("_next", "_said", "configured", "mismatches", "policy")

    def __init__(self, configured: HistoryPolicy) -> None:
        self.configured = configured
        self.policy = configured
        #: Times the gateways' kinds differed from the configured ones (logged once each).
        self.mismatches = 0
        self._next = 0.0
        self._said: bytes | None = None

    def due(self, now: float) -> bool:
        return now >= self._next

    def update(self, document: bytes | None, now: float) -> None:
        """Follow ``document`` (None: no gateway wrote one lately), read at ``now``."""
        self._next = now + REFRESH
        if document is None:
            self.policy = self.configured
            return
        try:
            found = parse_kinds(document)
        except ValueError as exc:
            if document != self._said:
                self._said = document
                log.warning("ignoring the gateways' channel kinds: %s", exc)
            self.policy = self.configured
            return
        if found != self.configured and self.configured.patterns and document != self._said:
            self._said = document
            self.mismatches += 1
            log.warning(
                "the gateways' history channels are %s (size %d), this publisher was "
                "configured with %s (size %d): following the gateways",
                list(found.patterns),
                found.size,
                list(self.configured.patterns),
                self.configured.size,
            )
        self.policy = found

"""Counters of a replica, plain integers bumped in bulk on the hot path.

Metrics exporters read them; nothing here does I/O or takes a lock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Stats"]


@dataclass(slots=True)
class Stats:
    connections_opened: int = 0
    connections_open: int = 0
    #: (close code, reason) -> count; reason is one of client, slow_consumer, drain, error...
    closes: Counter[tuple[int, str]] = field(default_factory=Counter)
    messages_received: int = 0  # envelopes from the backplane for channels with subscribers
    shed: int = 0  # envelopes dropped unread because fan-out could not keep up (backlog full)
    fanout: int = 0  # messages handed to sessions (written through or queued)
    writes: int = 0  # writes to client transports; one can carry several messages
    #: (policy, reason) -> deliveries dropped: reason "queue_full" (drop-oldest/-newest) or
    #: "closed" (still queued when the connection was closed)
    drops: Counter[tuple[str, str]] = field(default_factory=Counter)
    slow_consumers: int = 0  # sessions closed by the close policy
    stalled: int = 0  # sessions cut off after stall_timeout with a full transport
    refused: Counter[str] = field(default_factory=Counter)  # handshakes refused, by reason
    malformed: Counter[str] = field(default_factory=Counter)  # by reason
    #: History channels, by event: replayed (to resuming clients), latest (a channel's newest
    #: message, to a subscriber that wants its state), filled (read from the
    #: stream to fill a gap or an outage), duplicate (dropped), lost (gone from the stream
    #: before it could be read), unnumbered (a publisher that does not append).
    history: Counter[str] = field(default_factory=Counter)
    #: In-band token refreshes, by result: ok, refused (invalid, expired, another subject).
    refreshes: Counter[str] = field(default_factory=Counter)
    #: Control requests from services, by (op, result): ok, malformed (op "-"), dropped
    #: (the queue was full, op "-").
    control: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: Connections control requests acted on, by op.
    control_connections: Counter[str] = field(default_factory=Counter)
    #: Presence members written, by event: join, leave (of this replica's clients), reaped
    #: (the leaves of a dead replica's clients, sent by this one).
    presence: Counter[str] = field(default_factory=Counter)
    #: join and leave frames sent to the channels (each lists up to 100 members), by event.
    presence_events: Counter[str] = field(default_factory=Counter)
    #: Times this replica found another replica's channel kinds in Redis (publisher.kinds).
    kinds_mismatches: int = 0
    # Histogram recorders for the congested path, plugged in by the telemetry.
    record_queue_depth: Callable[[int], object] = field(default=lambda depth: None)
    record_latency: Callable[[float], object] = field(default=lambda seconds: None)

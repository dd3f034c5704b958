"""The replica's part of publisher.kinds: it tells publishers which channels keep history.

Every replica writes the same document when configured alike; one that finds another in
Redis is configured differently from a replica that wrote it (a deploy changing the
settings, or a mistake): counted and logged, since publishers follow whichever wrote last.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.backplane import Backplane, BackplaneUnavailable
from gateway.stats import Stats
from publisher.history import HistoryPolicy
from publisher.kinds import REFRESH, TTL_MS, kinds_document

__all__ = ["advertise"]

log = logging.getLogger("gateway.kinds")

#: Seconds before trying again when Redis did not take the document.
_RETRY = 1.0


async def advertise(backplane: Backplane, policy: HistoryPolicy, stats: Stats) -> None:
    """Write the document every :data:`~publisher.kinds.REFRESH` seconds, until cancelled."""
    document = kinds_document(policy)
    said: bytes | None = None
    while True:
        try:
            previous = await backplane.advertise(document, TTL_MS)
        except BackplaneUnavailable:
            await asyncio.sleep(_RETRY)
            continue
        if previous is not None and previous != document:
            stats.kinds_mismatches += 1
            if previous != said:  # once per other document, however often it comes back
                said = previous
                log.warning(
                    "another replica says other history channels than this one: %s, here %s; "
                    "publishers follow whichever wrote last",
                    previous.decode("utf-8", "replace"),
                    document.decode(),
                )
        await asyncio.sleep(REFRESH)

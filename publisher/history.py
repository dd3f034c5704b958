"""Where history channels keep their messages in Redis, and the two scripts that touch them.

A channel ``C`` whose name matches the history patterns keeps, besides its pub/sub channel
``<prefix>C``, two keys:

* ``{<prefix>C}:history``: a stream of the channel's last messages; entry id ``0-<offset>``,
  fields ``e`` (the envelope as published) and ``t`` (Redis time it was appended, unix ms);
* ``{<prefix>C}:meta``: a hash with the channel's ``epoch`` and its last ``offset``.

The ``{...}`` hash tag puts both keys in the slot of the pub/sub channel ``<prefix>C`` on a
Redis Cluster (a channel with a hash tag of its own, ``room{7}``, keeps it: the keys are
``<prefix>room{7}:history`` and ``<prefix>room{7}:meta``).

:data:`APPEND_LUA` numbers, stores and publishes a message in one atomic step, so
every subscriber sees offsets in order and the stream holds everything that was published.
If the meta hash is lost (a Redis restart without persistence, a FLUSHALL, its retention ran
out) the next append picks a new epoch and offsets restart at 1; clients holding the old epoch
learn that their position is gone. Publishers in other languages ``EVAL`` :data:`APPEND_LUA`
with the same keys and arguments (see :meth:`HistoryPolicy.append_args`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from fnmatch import fnmatchcase

__all__ = [
    "APPEND_LUA",
    "READ_LUA",
    "HistoryPolicy",
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


def numbered(envelope: bytes, offset: int, epoch: str) -> bytes:
    """The version 2 envelope of a version 1 one: what :data:`APPEND_LUA` stores and sends."""
    if not envelope.startswith(b'{"v":1,') or not envelope.endswith(b"}"):
        raise ValueError('envelope must be compact JSON starting with {"v":1,')
    return b'{"v":2,%s,"offset":%d,"epoch":"%s"}' % (envelope[7:-1], offset, epoch.encode())


def new_epoch() -> str:
    return secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class HistoryPolicy:
    """Which channels keep history, and how much of it."""

    patterns: tuple[str, ...] = ()
    size: int = 1000  # messages kept per channel
    ttl: float = 300.0  # seconds a message is kept
    retention: float = 86400.0  # seconds a silent channel keeps its stream and epoch

    def applies(self, channel: str) -> bool:
        return any(fnmatchcase(channel, pattern) for pattern in self.patterns)

    @property
    def retention_ms(self) -> int:
        return int(max(self.retention, self.ttl) * 1000)

    def append_args(
        self, pubsub_channel: str, envelope: bytes, *, sharded: bool = False
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
        ]

    @staticmethod
    def read_args(after: int, count: int, max_bytes: int) -> list[int]:
        """ARGV of :data:`READ_LUA`."""
        return [after, count, max_bytes]


#: KEYS: stream, meta. ARGV: pub/sub channel, version 1 envelope (compact JSON, as built by
#: publisher.envelope.build_envelope: it starts with {"v":1, and ends with }), size, ttl ms,
#: retention ms, an epoch to use if the channel has none (1 to 64 of ``A-Z a-z 0-9 _ -``,
#: else the script refuses it), and (optional) the publish command,
#: PUBLISH or SPUBLISH. Returns {offset, epoch, receivers}.
#: The stored and published envelope is the same one turned into version 2 with its offset
#: and epoch; entries older than ttl are trimmed from the head as new ones arrive.
APPEND_LUA = r"""
local envelope = ARGV[2]
if string.sub(envelope, 1, 7) ~= '{"v":1,' or string.sub(envelope, -1) ~= '}' then
  return redis.error_reply('ERR envelope must be compact JSON starting with {"v":1,')
end
local stream, meta = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = ARGV[6]
  -- Stored, an invalid epoch would make every message of the channel malformed.
  if #epoch > 64 or not string.match(epoch, '^[A-Za-z0-9_%-]+$') then
    return redis.error_reply('ERR epoch must be 1 to 64 of A-Z a-z 0-9 _ -')
  end
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', epoch, 'offset', 0)
end
local offset = redis.call('HINCRBY', meta, 'offset', 1)
local final = '{"v":2,' .. string.sub(envelope, 8, -2)
  .. ',"offset":' .. offset .. ',"epoch":"' .. epoch .. '"}'
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('XADD', stream, 'MAXLEN', ARGV[3], '0-' .. offset, 'e', final, 't', now_ms)
local cutoff = now_ms - tonumber(ARGV[4])
local head = redis.call('XRANGE', stream, '-', '+', 'COUNT', 32)
local keep = nil
for _, entry in ipairs(head) do
  if tonumber(entry[2][4]) >= cutoff then keep = entry[1] break end
end
if keep and keep ~= head[1][1] then
  redis.call('XTRIM', stream, 'MINID', keep)
elseif not keep and #head > 0 then
  redis.call('XTRIM', stream, 'MINID', '0-' .. (tonumber(string.sub(head[#head][1], 3)) + 1))
end
redis.call('PEXPIRE', stream, ARGV[5])
redis.call('PEXPIRE', meta, ARGV[5])
local receivers = redis.call(ARGV[7] == 'SPUBLISH' and 'SPUBLISH' or 'PUBLISH', ARGV[1], final)
return {offset, epoch, receivers}
"""

#: KEYS: stream, meta. ARGV: the offset to read after, how many entries at most, how many
#: envelope bytes at most. Returns {epoch, last offset, {{id, {'e', envelope, 't', ms}}, ...}}
#: in one atomic read: the newest entries after the offset that fit both limits, oldest
#: first (a reader far behind learns at once that its gap is larger than it may replay).
#: A channel never published to has no epoch (nil) and top 0: a read creates no key.
READ_LUA = r"""
local state = redis.call('HMGET', KEYS[2], 'epoch', 'offset')
if not state[1] then
  return {false, 0, {}}
end
local newest = redis.call('XREVRANGE', KEYS[1], '+', '(0-' .. ARGV[1], 'COUNT', ARGV[2])
local budget = tonumber(ARGV[3])
local entries = {}
for _, entry in ipairs(newest) do
  budget = budget - #entry[2][2]
  if budget < 0 then break end
  table.insert(entries, 1, entry)
end
return {state[1], tonumber(state[2]), entries}
"""

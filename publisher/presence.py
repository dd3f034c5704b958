"""Where presence lives in Redis, and the scripts that keep it. Pure.

A channel ``C`` with presence keeps, in the slot of its pub/sub channel (as history does):

* ``<base>:presence``: a hash, client id -> the member's entry, compact JSON
  ``{"client":"<id>","user":"<sub>"|null,"info":<the token's info claim>}`` (``info`` only
  when the token has one);
* ``<base>:presence:exp``: a sorted set, client id -> when the entry expires (unix ms);
* ``<base>:presence:users``: a hash, user -> how many of their clients are members.

``<base>`` is ``{<prefix>C}``, or ``<prefix>C`` when the channel has a hash tag of its own.
Redis 7.0 has no expiry per hash field: the sorted set holds each entry's, every script
first removes up to :data:`PURGE` expired entries, and the replica that holds a client pushes
its expiry forward (every third of the time to live). Each key also expires as a whole a time
to live after its last write, so a channel nobody holds leaves nothing behind.

Replicas hold a lease: ``<prefix>@@replicas`` is a sorted set, replica name -> when its lease
expires (unix ms), and ``<prefix>@@replica.<name>`` the set of its members, each
``<client id> <channel>``. A replica whose lease expired is claimed by exactly one survivor
(whose ``ZREM`` of it returns 1), which removes its members from each channel's presence and
sends their ``leave`` events.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from publisher.history import hash_tag

__all__ = [
    "JOIN_LUA",
    "LEAVE_LUA",
    "PURGE",
    "READ_LUA",
    "REPLICAS",
    "STATS_LUA",
    "TOUCH_LUA",
    "PresencePolicy",
    "member",
    "member_parts",
    "presence_keys",
    "replica_key",
]


@dataclass(frozen=True, slots=True)
class PresencePolicy:
    """Which channels keep presence and send join/leave frames, and how long things live
    (seconds)."""

    patterns: tuple[str, ...] = ()
    join_leave: tuple[str, ...] = ()
    ttl: float = 60.0
    lease: float = 10.0
    page: int = 1000
    window: float = 0.1

    def applies(self, channel: str) -> bool:
        return any(fnmatchcase(channel, pattern) for pattern in self.patterns)

    def announces(self, channel: str) -> bool:
        """Whether ``channel``'s subscribers get join and leave frames."""
        return self.applies(channel) and any(
            fnmatchcase(channel, pattern) for pattern in self.join_leave
        )


#: Expired entries one script call removes at most (the rest go on later calls).
PURGE = 1000

#: The lease of every replica (publisher.control.RESERVED_PREFIX: no client can name it).
REPLICAS = "@@replicas"


def presence_keys(prefix: str, channel: str) -> list[str]:
    """The entries, expiries and users keys of ``channel``, in its pub/sub channel's slot."""
    name = prefix + channel
    base = name if hash_tag(name) is not None else "{" + name + "}"
    return [base + ":presence", base + ":presence:exp", base + ":presence:users"]


def replica_key(prefix: str, replica: str) -> str:
    """The set of the members a replica holds."""
    return f"{prefix}@@replica.{replica}"


def member(client: str, channel: str) -> str:
    """One entry of a replica's member set (client ids have no spaces, channels neither)."""
    return f"{client} {channel}"


def member_parts(entry: bytes | str) -> tuple[str, str]:
    text = entry.decode() if isinstance(entry, bytes) else entry
    client, _, channel = text.partition(" ")
    return client, channel


# remove(client) takes one member out of the three keys and returns its entry (nil if it was
# not there); purge(limit, now) removes up to ARGV[1] (PURGE) members that expired before
# ARGV[2] (now, ms). Keys as presence_keys. Shared by every script below.
_PURGE = """
local function remove(client)
  local entry = redis.call('HGET', KEYS[1], client)
  redis.call('ZREM', KEYS[2], client)
  if not entry then return nil end
  redis.call('HDEL', KEYS[1], client)
  local user = cjson.decode(entry)['user']
  if type(user) == 'string' and redis.call('HINCRBY', KEYS[3], user, -1) <= 0 then
    redis.call('HDEL', KEYS[3], user)
  end
  return entry
end
local function purge(limit, now)
  local gone = redis.call('ZRANGE', KEYS[2], '-inf', '(' .. now, 'BYSCORE', 'LIMIT', 0, limit)
  for _, client in ipairs(gone) do remove(client) end
end
"""

#: KEYS: presence_keys. ARGV: PURGE, now ms, expiry ms (now + ttl), ttl ms, then for each
#: member: client id, user ('' if anonymous), entry. Adds new members and pushes every given
#: member's expiry forward; returns how many were new.
JOIN_LUA = (
    _PURGE
    + """
purge(tonumber(ARGV[1]), ARGV[2])
local added = 0
for i = 5, #ARGV, 3 do
  local client, user = ARGV[i], ARGV[i + 1]
  if redis.call('HSET', KEYS[1], client, ARGV[i + 2]) == 1 then
    added = added + 1
    if user ~= '' then redis.call('HINCRBY', KEYS[3], user, 1) end
  end
  redis.call('ZADD', KEYS[2], ARGV[3], client)
end
for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, ARGV[4]) end
return added
"""
)

#: KEYS: presence_keys. ARGV: PURGE, now ms, expiry ms (now + ttl), ttl ms, then client ids.
#: Pushes the expiry of those that are there forward; returns how many were not (Redis lost
#: them: the replica writes them again).
TOUCH_LUA = (
    _PURGE
    + """
purge(tonumber(ARGV[1]), ARGV[2])
local missing = 0
for i = 5, #ARGV do
  if redis.call('ZADD', KEYS[2], 'XX', 'CH', ARGV[3], ARGV[i]) == 0
      and not redis.call('ZSCORE', KEYS[2], ARGV[i]) then
    missing = missing + 1
  end
end
for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, ARGV[4]) end
return missing
"""
)

#: KEYS: presence_keys. ARGV: PURGE, now ms, then client ids. Removes them; returns the
#: entries that were there (what leave events name).
LEAVE_LUA = (
    _PURGE
    + """
purge(tonumber(ARGV[1]), ARGV[2])
local removed = {}
for i = 3, #ARGV do
  local entry = remove(ARGV[i])
  if entry then removed[#removed + 1] = entry end
end
return removed
"""
)

#: KEYS: presence_keys. ARGV: PURGE, now ms, cursor, count. One HSCAN page of the entries:
#: {next cursor ('0' at the end), entries}. A member may appear on two pages if the hash is
#: resized meanwhile; Redis returns a small hash whole, whatever the count.
READ_LUA = (
    _PURGE
    + """
purge(tonumber(ARGV[1]), ARGV[2])
local page = redis.call('HSCAN', KEYS[1], ARGV[3], 'COUNT', ARGV[4])
local entries = {}
for i = 2, #page[2], 2 do entries[#entries + 1] = page[2][i] end
return {page[1], entries}
"""
)

#: KEYS: presence_keys. ARGV: PURGE, now ms. {clients, unique users}.
STATS_LUA = (
    _PURGE
    + """
purge(tonumber(ARGV[1]), ARGV[2])
return {redis.call('HLEN', KEYS[1]), redis.call('HLEN', KEYS[3])}
"""
)

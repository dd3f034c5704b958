-- Read a history channel's newest entries after an offset, atomically (the gateways' read).
--
-- KEYS[1] the stream, KEYS[2] the meta hash (as for history_append.lua)
-- ARGV[1] the offset to read after   ARGV[2] entries at most   ARGV[3] envelope bytes at most
--
-- Returns {epoch, last offset, {{id, {'e', envelope, 't', ms}}, ...}}: the newest entries after
-- the offset that fit both limits, oldest first (a reader far behind learns at once that its
-- gap is larger than it may replay). A channel never published to has no epoch (nil) and top
-- 0: a read creates no key.
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

-- Append one message to a history channel: check it, number it, store it, publish it, in one
-- atomic step (docs/protocol.md, "Publishing to a history channel", says it argument by argument).
--
-- KEYS[1] the stream           {<prefix><channel>}:history  (a channel with a {tag} of its own:
-- KEYS[2] the meta hash        {<prefix><channel>}:meta      <prefix><channel>:history, ...)
-- KEYS[3] idempotency records  {<prefix><channel>}:idempotency      (optional: with ARGV[8])
-- KEYS[4] their expiries       {<prefix><channel>}:idempotency:exp  (optional: with ARGV[8])
--
-- ARGV[1] the pub/sub channel, <prefix><channel>
-- ARGV[2] the envelope, version 1: any JSON object the envelope schema accepts, in any key
--         order, compact or not
-- ARGV[3] messages kept in the stream        ARGV[4] milliseconds a message is kept
-- ARGV[5] milliseconds a silent channel keeps its stream, epoch and records
-- ARGV[6] the epoch to start if the channel has none: 1 to 64 of A-Z a-z 0-9 _ -
-- ARGV[7] PUBLISH, or SPUBLISH on a Redis Cluster (optional, default PUBLISH)
-- ARGV[8] idempotency key: 1 to 128 printable ASCII, or empty for none (optional)
-- ARGV[9] milliseconds a key is remembered (with ARGV[8])
-- ARGV[10] version: a whole number from 0 to 2^53; the message is dropped unless it is above
--          the channel's current version. Empty for none (optional)
--
-- Returns {offset, epoch, receivers, outcome}: outcome "published"; "duplicate" (the key was
-- seen within its window: the first message's offset, nothing stored or sent); "stale" (the
-- version is not above the channel's: its current top, nothing stored or sent).
-- Errors ("ERR ..." replies) say what is wrong and change nothing.

local envelope, channel = ARGV[2], ARGV[1]

local function refuse(why)
  return redis.error_reply('ERR ' .. why)
end

-- The keys must be the channel's: followed from stale docs, other names split its history.
-- A channel with a {tag} of its own keeps it, as Redis Cluster hashes only the tag.
local open = string.find(channel, '{', 1, true)
local close = open and string.find(channel, '}', open + 1, true)
local base = (close and close > open + 1) and channel or '{' .. channel .. '}'
if KEYS[1] ~= base .. ':history' or KEYS[2] ~= base .. ':meta' then
  return refuse('keys must be ' .. base .. ':history and ' .. base .. ':meta')
end
for i = 3, 5 do
  if not string.match(ARGV[i] or '', '^[1-9]%d*$') then
    return refuse('argument ' .. i .. ' must be a whole number from 1')
  end
end

-- The envelope: strict JSON (cjson alone takes NaN, 0x10, 01), UTF-8, an object.
if #envelope > 1048576 then
  return refuse('envelope is over 1048576 bytes')
end
-- Compact ASCII JSON, the common case, has neither control characters nor bytes above 127:
-- one pass tells, and only other text pays for the exact checks.
if string.find(envelope, '[%c\128-\255]') then
  if string.find(envelope, '[%z\1-\8\11\12\14-\31]') then
    return refuse('envelope has a control character (escape it inside strings)')
  end
  local high = string.find(envelope, '[\128-\255]')
  while high do
    local b, n = string.byte(envelope, high), 0
    local lo, hi = 128, 191
    if b >= 194 and b <= 223 then n = 1
    elseif b >= 224 and b <= 239 then
      n = 2
      if b == 224 then lo = 160 elseif b == 237 then hi = 159 end
    elseif b >= 240 and b <= 244 then
      n = 3
      if b == 240 then lo = 144 elseif b == 244 then hi = 143 end
    else
      return refuse('envelope is not UTF-8')
    end
    for i = 1, n do
      local c = string.byte(envelope, high + i)
      if not c or c < (i == 1 and lo or 128) or c > (i == 1 and hi or 191) then
        return refuse('envelope is not UTF-8')
      end
    end
    high = string.find(envelope, '[\128-\255]', high + n + 1)
  end
end
-- Outside strings, only JSON literals and numbers: cjson also takes NaN, Infinity and 0x10,
-- which encoders write (Python's json writes NaN), so they are looked for, on the text without
-- its strings. Forms no encoder writes (01, 1., -.5) cost a pass each and are not: the
-- gateways drop such a message as malformed, counted.
local bare = string.gsub(string.gsub(envelope, '\\.', ''), '"[^"]*"', '')
if string.find(bare, '[^%s,:%[%]{}%d.%-]') then  -- a letter or a +: literals, exponents, NaN
  bare = string.gsub(string.gsub(string.gsub(bare, 'true', ''), 'false', ''), 'null', '')
  local at = string.find(bare, '[^%s,:%[%]{}%deE.+%-]')
  if at then
    return refuse('envelope is not JSON near ' .. string.sub(bare, math.max(at - 8, 1), at + 8))
  end
end

-- Its top-level members, as written (the stored envelope keeps them byte for byte), each
-- value decoded once by cjson: that checks the whole text, with the walk between them.
local function skip(at)
  return string.find(envelope, '[^ \t\r\n]', at)
end
local function string_end(at)
  local i = at + 1
  while true do
    local q = string.find(envelope, '["\\]', i)
    if not q or string.sub(envelope, q, q) == '"' then return q end
    i = q + 2
  end
end
local function value_end(at)
  local c = string.sub(envelope, at, at)
  if c == '"' then return string_end(at) end
  if c == '{' or c == '[' then
    -- Balanced brackets (matched in C) end the value, unless a string inside holds one:
    -- then the text they span does not decode, and the walk below finds the end.
    local _, balanced = string.find(envelope, c == '{' and '^%b{}' or '^%b[]', at)
    if balanced then
      local ok, value = pcall(cjson.decode, string.sub(envelope, at, balanced))
      if ok then return balanced, value end
    end
    local depth, i = 0, at
    while true do
      local q = string.find(envelope, '[%[%]{}"]', i)
      if not q then return nil end
      local d = string.sub(envelope, q, q)
      if d == '"' then
        i = (string_end(q) or #envelope) + 1
      else
        depth = depth + ((d == '{' or d == '[') and 1 or -1)
        if depth == 0 then return q end
        i = q + 1
      end
    end
  end
  local stop = string.find(envelope, '[ \t\r\n,}]', at)
  return stop and stop - 1
end
local doc, raw, members = {}, {}, {}
local function member(at)
  if string.sub(envelope, at or 0, at or 0) ~= '"' then return nil end
  local key_end = string_end(at)
  local colon = key_end and skip(key_end + 1)
  if not colon or string.sub(envelope, colon, colon) ~= ':' then return nil end
  local ok, key = pcall(cjson.decode, string.sub(envelope, at, key_end))
  local value_at = skip(colon + 1)
  local last, value = value_end(value_at or #envelope + 1)
  if not ok or not last then return nil end
  if value == nil then
    ok, value = pcall(cjson.decode, string.sub(envelope, value_at, last))
    if not ok then return nil end
  end
  if raw[key] then return nil, key end
  doc[key], raw[key] = value, string.sub(envelope, value_at, last)
  if key ~= 'v' then table.insert(members, string.sub(envelope, at, last)) end
  return last
end
local at = skip(1)
if not at or string.sub(envelope, at, at) ~= '{' then
  return refuse('envelope is not a JSON object')
end
at = skip(at + 1)
if string.sub(envelope, at or 0, at or 0) ~= '}' then
  while true do
    local last, twice = member(at)
    if twice then return refuse('envelope has member ' .. twice .. ' twice') end
    at = last and skip(last + 1)
    local c = at and string.sub(envelope, at, at)
    if c == '}' then break end
    if c ~= ',' then return refuse('envelope is not a JSON object') end
    at = skip(at + 1)
  end
end
if skip(at + 1) then
  return refuse('envelope has text after its object')
end

local TRACEPARENT = '^' .. string.rep('[0-9a-f]', 2) .. '%-' .. string.rep('[0-9a-f]', 32)
  .. '%-' .. string.rep('[0-9a-f]', 16) .. '%-' .. string.rep('[0-9a-f]', 2) .. '$'
local function absent(value) return value == nil or value == cjson.null end
if type(doc.v) ~= 'number' or doc.v ~= 1 then
  return refuse('envelope v must be 1')
end
if type(doc.channel) ~= 'string' or #doc.channel == 0
    or string.sub(channel, -#doc.channel) ~= doc.channel then
  return refuse('envelope channel must be the channel published to, without prefix')
end
if doc.data == nil then return refuse('envelope needs data') end
if type(doc.mid) ~= 'string' or #doc.mid > 128 or not string.match(doc.mid, '^[!-~]+$') then
  return refuse('envelope mid must be 1 to 128 printable ASCII characters')
end
if not raw.ts or not string.match(raw.ts, '^%d+$') then
  return refuse('envelope ts must be a whole number of unix milliseconds')
end
if not absent(doc.traceparent) and (type(doc.traceparent) ~= 'string'
    or not string.match(doc.traceparent, TRACEPARENT)) then
  return refuse('envelope traceparent is not a W3C traceparent')
end
if not absent(doc.tracestate) and (type(doc.tracestate) ~= 'string' or #doc.tracestate > 512) then
  return refuse('envelope tracestate must be a string of at most 512 characters')
end
if raw.offset or raw.epoch or raw.event then
  return refuse('envelope must not carry offset, epoch or event: they are the gateway\'s')
end

-- The other arguments.
local key, window, version = ARGV[8] or '', tonumber(ARGV[9]), ARGV[10] or ''
if key ~= '' then
  if #key > 128 or not string.match(key, '^[!-~]+$') then
    return refuse('idempotency key must be 1 to 128 printable ASCII characters')
  end
  if not window or window < 1 or window ~= math.floor(window) then
    return refuse('idempotency window must be a whole number of milliseconds from 1')
  end
  if not KEYS[4] or KEYS[3] ~= base .. ':idempotency' or KEYS[4] ~= base .. ':idempotency:exp' then
    return refuse('an idempotency key needs keys 3 and 4, ' .. base .. ':idempotency and its :exp')
  end
end
if version ~= '' and (not string.match(version, '^[1-9]%d*$') and version ~= '0'
    or #version > 16 or (#version == 16 and version > '9007199254740992')) then
  return refuse('version must be a whole number from 0 to 2^53')
end

local stream, meta = KEYS[1], KEYS[2]
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local state = redis.call('HMGET', meta, 'epoch', 'offset', 'version')
local epoch = state[1]
if not epoch then
  epoch = ARGV[6]
  -- Stored, an invalid epoch would make every message of the channel malformed.
  if #epoch > 64 or not string.match(epoch, '^[A-Za-z0-9_%-]+$') then
    return refuse('epoch must be 1 to 64 of A-Z a-z 0-9 _ -')
  end
  redis.call('DEL', stream)
  if KEYS[4] then redis.call('DEL', KEYS[3], KEYS[4]) end
  redis.call('HSET', meta, 'epoch', epoch, 'offset', 0)
  state = {epoch, '0', false}
end

if key ~= '' then
  local expired = redis.call('ZRANGE', KEYS[4], '-inf', now_ms, 'BYSCORE', 'LIMIT', 0, 64)
  if #expired > 0 then
    redis.call('ZREM', KEYS[4], unpack(expired))
    redis.call('HDEL', KEYS[3], unpack(expired))
  end
  local first = redis.call('HGET', KEYS[3], key)
  if first then
    return {tonumber(first), epoch, 0, 'duplicate'}
  end
end
if version ~= '' and state[3] and tonumber(version) <= tonumber(state[3]) then
  return {tonumber(state[2]), epoch, 0, 'stale'}
end

local offset = redis.call('HINCRBY', meta, 'offset', 1)
if version ~= '' then redis.call('HSET', meta, 'version', version) end
local final = '{"v":2,' .. table.concat(members, ',')
  .. ',"offset":' .. offset .. ',"epoch":"' .. epoch .. '"}'
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
local retention = ARGV[5]
redis.call('PEXPIRE', stream, retention)
redis.call('PEXPIRE', meta, retention)
if key ~= '' then
  redis.call('HSET', KEYS[3], key, offset)
  redis.call('ZADD', KEYS[4], now_ms + window, key)
  redis.call('PEXPIRE', KEYS[3], math.max(tonumber(retention), window))
  redis.call('PEXPIRE', KEYS[4], math.max(tonumber(retention), window))
end
local receivers = redis.call(ARGV[7] == 'SPUBLISH' and 'SPUBLISH' or 'PUBLISH', channel, final)
return {offset, epoch, receivers, 'published'}

local ttl, events_kept, keep = ARGV[1], ARGV[2], tonumber(ARGV[3])
-- Index entries are gathered across the call and added with one ZADD per key after every
-- event, then the upkeep the events asked for, in their order: a call's events mostly share
-- their account's two indexes, and a command per entry cost more than the entries.
local index_keys, entries, upkeeps = {}, {}, {}
local function index(key, score, member)
  local list = entries[key]
  if not list then
    list = {}
    entries[key] = list
    index_keys[#index_keys + 1] = key
  end
  list[#list + 1] = score
  list[#list + 1] = member
end
local function upkeep(key, keep_newest)
  upkeeps[#upkeeps + 1] = {key, keep_newest}
end
-- Endpoint lists' versions as read in this call: its events mostly share their account's list,
-- and nothing else writes while a script runs, so one GET per list and call is exact.
local versions = {}
local function version(key)
  local v = versions[key]
  if not v then
    v = redis.call('GET', key) or '0'
    versions[key] = v
  end
  return v
end
-- The event whose keys follow KEYS[k] and whose arguments follow its count of deliveries at ARGV[c].
local function arrive(k, c, deliveries)
  if version(KEYS[k + 1]) ~= ARGV[c + 1] then return {'stale'} end
  local now = ARGV[c + 3]
  local out = {'ok', ''}
  local first = redis.call('SET', KEYS[k + 2], ARGV[c + 2], 'NX', 'EX', ttl)
  if first then
    index(KEYS[k + 3], now, ARGV[c + 4])
  else
    out[2] = redis.call('GET', KEYS[k + 2])
  end
  if ARGV[c + 5] == '1' then upkeep(KEYS[k + 3], tonumber(events_kept)) end
  for i = 0, deliveries - 1 do
    local dk, due, idx = KEYS[k + 5 + i * 3], KEYS[k + 6 + i * 3], KEYS[k + 7 + i * 3]
    local a = c + 7 + i * 10
    if not first and redis.call('HSETNX', dk, 'event', ARGV[a + 2]) == 0 then
      out[#out + 1] = '0'
    else
      -- Under a lease (pending), or deferred (retrying) until its next attempt; no table built.
      -- `attempts` and `cycle_start` stay absent until a record or a redelivery writes them, and
      -- every reader takes absent as 0: two fields fewer cost Redis 2% less per delivery.
      local last, value = 'lease', ARGV[a + 8]
      if value == '' then last, value = 'next_attempt', ARGV[a + 7] end
      redis.call('HSET', dk, 'event', ARGV[a + 2], 'endpoint', ARGV[a + 3], 'account', ARGV[a + 4],
        'type', ARGV[a + 5], 'status', ARGV[a + 6], 'created', now,
        last, value)
      redis.call('EXPIRE', dk, ttl)
      redis.call('ZADD', due, ARGV[a + 7], ARGV[a])
      index(idx, now, ARGV[a + 1])
      index(KEYS[k + 4], now, ARGV[a + 1])
      out[#out + 1] = '1'
    end
    if ARGV[a + 9] == '1' then upkeep(idx, nil) end
  end
  if ARGV[c + 6] == '1' then upkeep(KEYS[k + 4], keep * 10) end
  return out
end
local out, k, c = {}, 0, 4
while c <= #ARGV do
  local deliveries = tonumber(ARGV[c])
  out[#out + 1] = arrive(k, c, deliveries)
  k = k + 4 + deliveries * 3
  c = c + 7 + deliveries * 10
end
-- In slices: Lua's unpack takes at most about 8,000 values, and one event of thousands of
-- endpoints gives its account's index two per delivery.
for _, key in ipairs(index_keys) do
  local list = entries[key]
  for from = 1, #list, 1000 do
    redis.call('ZADD', key, unpack(list, from, math.min(from + 999, #list)))
  end
end
for _, u in ipairs(upkeeps) do
  if u[2] then redis.call('ZREMRANGEBYRANK', u[1], 0, -u[2] - 1) end
  redis.call('EXPIRE', u[1], ttl)
end
return out

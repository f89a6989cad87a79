-- Gathered across the call's records in flat tables, so gathering allocates little in Lua:
-- counts per (bucket, field); per health key the last record's arguments, its latest success
-- and its failing_since.
local ttl_5m, ttl_1h, keep, prefix = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local counted, count_key, count_field, count_ttl, count_n = {}, {}, {}, {}, {}
local health_keys, last_of, success_of, failing_of = {}, {}, {}, {}
local function count(key, field, ttl)
  local id = key .. '\n' .. field
  local i = counted[id]
  if i then
    count_n[i] = count_n[i] + 1
  else
    i = #count_key + 1
    counted[id], count_key[i], count_field[i], count_ttl[i], count_n[i] = i, key, field, ttl, 1
  end
end
local function record(k, a)
  local state, due, health, idx = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 6]
  local lease, attempt, status, attempts, first, next_at, reason, job, outcome, latency, at,
    delivery, code = unpack(ARGV, a + 1, a + 13)
  local failing = ''
  local held = redis.call('HMGET', state, 'lease', 'logged')
  -- A released lease is stored empty, so an empty token never holds it.
  local ours = lease ~= '' and held[1] == lease
  local n
  if attempt ~= '' then
    n = tonumber(held[2] or 0) + 1
    if n > 100 then redis.call('HDEL', state, 'att:' .. (n - 100)) end
    count(KEYS[k + 4], outcome .. '|' .. latency, ttl_5m)
    count(KEYS[k + 5], outcome .. '|' .. latency, ttl_1h)
    -- The endpoint's health as this record leaves it; an empty failing_since means not failing.
    if not last_of[health] then health_keys[#health_keys + 1] = health end
    last_of[health] = a
    if outcome == 'success' then
      success_of[health], failing_of[health] = at, ''
    else
      failing = failing_of[health] or redis.call('HGET', health, 'failing_since') or ''
      if failing == '' then failing = at end
      failing_of[health] = failing
    end
  end
  if not ours then
    -- Only the attempt, and only into a delivery that still exists (a write would recreate an
    -- expired one without a lifetime).
    if n and redis.call('EXISTS', state) == 1 then
      redis.call('HSET', state, 'att:' .. n, attempt, 'logged', n)
    end
    return {0, failing}
  end
  -- The state keeps the lifetime it got when the delivery began (retention from creation).
  -- One write: the attempt, the lease released and an absent next attempt cleared by empty
  -- values (read back as none), which costs less than a separate HDEL.
  local set = {'status', status, 'attempts', attempts, 'lease', '', 'next_attempt', next_at}
  if n then
    set[#set + 1] = 'att:' .. n; set[#set + 1] = attempt
    set[#set + 1] = 'logged'; set[#set + 1] = n
  end
  if first ~= '' then set[#set + 1] = 'first_attempt'; set[#set + 1] = first end
  if reason ~= '' then set[#set + 1] = 'reason'; set[#set + 1] = reason end
  if next_at ~= '' then
    redis.call('ZADD', due, next_at, job)
  else
    redis.call('ZREM', due, job)
  end
  redis.call('HSET', state, unpack(set))
  if status == 'succeeded' or status == 'failed' then trim_history(idx, keep, prefix, health) end
  return {1, failing}
end
local out = {}
for r = 0, #KEYS / 6 - 1 do out[r + 1] = record(r * 6, 4 + r * 13) end
for i, key in ipairs(count_key) do
  -- A bucket's first count of a field sets its lifetime; later ones need not.
  if redis.call('HINCRBY', key, count_field[i], count_n[i]) == count_n[i] then
    redis.call('EXPIRE', key, count_ttl[i])
  end
end
for _, health in ipairs(health_keys) do
  local a = last_of[health]
  local set = {'last_at', ARGV[a + 11], 'last_outcome', ARGV[a + 9], 'last_status', ARGV[a + 13],
    'last_delivery', ARGV[a + 12], 'failing_since', failing_of[health]}
  if success_of[health] then set[#set + 1] = 'last_success'; set[#set + 1] = success_of[health] end
  redis.call('HSET', health, unpack(set))
end
return out

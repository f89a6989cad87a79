-- `trim_history(idx, keep, prefix, health)`, prepended to the record script.
-- Keeps an endpoint's history (sorted set `idx`) to its newest `keep` entries by deleting
-- the oldest *finished* deliveries; unfinished ones stay listed until they finish. Run when a
-- delivery finishes. It lets the history grow by `keep / 64` before trimming, so a busy
-- endpoint pays for one scan and two deletes per 150 deliveries instead of per delivery. A scan
-- looks at no more than that batch (plus ten). When the oldest entries are unfinished (a
-- backlog waiting on a slow or failing endpoint), a scan finds too few to delete, and the point
-- at which to look again, once the history has grown by another batch, goes into the
-- endpoint's health hash (`trim_at`, cleared by the next scan that finds a full batch):
-- otherwise every finish would look at the same unfinished entries again, which made a record
-- cost seven times as much (140 µs of Redis instead of 18, `laabam-bench redis-calls`). The
-- price: a backlog that finishes while nothing new arrives stays listed past the bound until
-- another batch arrives (or its retention ends), and then goes a window per finish.
-- A history's size and its endpoint's `trim_at` are read once per call and then kept here: a
-- call's records mostly share an endpoint, and while the script runs only this function
-- changes either, so the kept values are exact (a ZCARD per record was a tenth of its commands).
local history_sizes, trim_ats = {}, {}
local function trim_history(idx, keep, prefix, health)
  local slack = math.floor(keep / 64)
  local count = history_sizes[idx]
  if not count then
    count = redis.call('ZCARD', idx)
    history_sizes[idx] = count
  end
  if count <= keep + slack then return end
  local trim_at = trim_ats[health]
  if trim_at == nil then
    trim_at = tonumber(redis.call('HGET', health, 'trim_at')) or false
    trim_ats[health] = trim_at
  end
  if trim_at and count < trim_at then return end
  local excess = count - keep
  local batch = math.min(excess, slack + 1)
  local keys, members = {}, {}
  for _, old in ipairs(redis.call('ZRANGE', idx, 0, batch + 9)) do
    local old_key = prefix .. 'dlv:' .. old
    local st = redis.call('HGET', old_key, 'status')
    if st ~= 'pending' and st ~= 'retrying' then
      keys[#keys + 1] = old_key
      members[#members + 1] = old
      if #members == excess then break end
    end
  end
  if #members > 0 then
    redis.call('DEL', unpack(keys))
    redis.call('ZREM', idx, unpack(members))
    history_sizes[idx] = count - #members
  end
  if #members < batch then
    trim_ats[health] = count - #members + slack
    redis.call('HSET', health, 'trim_at', trim_ats[health])
  elseif trim_at then
    trim_ats[health] = false
    redis.call('HDEL', health, 'trim_at')
  end
end

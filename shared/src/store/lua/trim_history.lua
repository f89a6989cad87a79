-- Keeps an endpoint's history (sorted set KEYS[1]) to its newest ARGV[1] entries by deleting
-- the oldest *finished* deliveries; unfinished ones stay listed until they finish. A record
-- that finishes a delivery calls it once the history has grown by `keep / 64` past its bound,
-- so a busy endpoint pays for one scan and two deletes per 150 deliveries instead of per
-- delivery. A scan looks at no more than that batch (plus ten). When the oldest entries are
-- unfinished (a backlog waiting on a slow or failing endpoint), a scan finds too few to delete,
-- and the point at which to look again, once the history has grown by another batch, goes into
-- the endpoint's health hash (KEYS[2], `trim_at`, cleared by the next scan that finds a full
-- batch): otherwise every finish would look at the same unfinished entries again, which made a
-- record cost seven times as much (140 µs of Redis instead of 18, `laabam-bench redis-calls`).
-- The price: a backlog that finishes while nothing new arrives stays listed past the bound until
-- another batch arrives (or its retention ends), and then goes a window per finish.
-- ARGV[2] is the key prefix, which a delivery's state key starts with. ARGV[3] is how many of
-- the endpoint's deliveries the caller's batch finished: the call trims what that many finishes
-- would have, one after another, each trimming up to `slack + 1` while the history is past its
-- bound and slack.
local idx, health, keep, prefix = KEYS[1], KEYS[2], tonumber(ARGV[1]), ARGV[2]
local finishes = tonumber(ARGV[3])
local slack = math.floor(keep / 64)
local count = redis.call('ZCARD', idx)
if count <= keep + slack then return end
local trim_at = tonumber(redis.call('HGET', health, 'trim_at'))
if trim_at and count < trim_at then return end
local batch, left = 0, count
for _ = 1, finishes do
  if left <= keep + slack then break end
  local step = math.min(left - keep, slack + 1)
  batch, left = batch + step, left - step
end
local keys, members = {}, {}
for _, old in ipairs(redis.call('ZRANGE', idx, 0, batch + 9)) do
  local old_key = prefix .. 'dlv:' .. old
  local st = redis.call('HGET', old_key, 'status')
  if st ~= 'pending' and st ~= 'retrying' then
    keys[#keys + 1] = old_key
    members[#members + 1] = old
    if #members == batch then break end
  end
end
if #members > 0 then
  redis.call('DEL', unpack(keys))
  redis.call('ZREM', idx, unpack(members))
end
if #members < batch then
  redis.call('HSET', health, 'trim_at', count - #members + slack)
elseif trim_at then
  redis.call('HDEL', health, 'trim_at')
end

local now, lease, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local out = {0, -1}
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)) do
  if redis.call('ZSCORE', KEYS[1], m) then
    redis.call('ZREM', KEYS[2], m)
  else
    redis.call('ZADD', KEYS[2], lease, m)
    out[1] = out[1] + 1
    out[#out + 1] = m
  end
end
local room = limit - (#out - 2)
if room > 0 then
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, room)
  if #due > 0 then out[2] = math.floor(tonumber(due[2])) end
  for i = 1, #due, 2 do
    local m = due[i]
    redis.call('ZREM', KEYS[1], m)
    redis.call('ZADD', KEYS[2], lease, m)
    out[#out + 1] = m
  end
end
return out

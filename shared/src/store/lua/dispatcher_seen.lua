-- Records a dispatcher as running now and says how many are, by Redis's clock, which every
-- dispatcher shares: one whose own clock ran ahead would otherwise take the others for gone.
-- KEYS[1]: the dispatchers, scored by when each was last seen (ms). ARGV[1]: this one's id;
-- ARGV[2]: how long one not seen counts as running, ms.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gone_after = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - gone_after)
-- Gone with the last dispatcher, even one killed.
redis.call('PEXPIRE', KEYS[1], 2 * gone_after)
return redis.call('ZCARD', KEYS[1])

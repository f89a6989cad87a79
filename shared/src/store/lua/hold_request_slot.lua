-- A place among an endpoint's requests in flight across every dispatcher. KEYS[1]: the holders,
-- scored by when each lease ends, in ms of Redis's clock, which every dispatcher shares (a
-- holder that died stops counting then). ARGV[1]: the endpoint's max_concurrency; ARGV[2]: the
-- holder; ARGV[3]: its lease, ms. Returns 1 with the place held, 0 when all are.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
-- Every lease is as long, so the newest ends last.
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
